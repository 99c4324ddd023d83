"""Probes of `vlmkit serve` on a tiny random model (traffic to 127.0.0.1 only, every loop bounded):

  1. schemathesis against the server's own OpenAPI document, all checks (`bench/schemathesis.toml`);
  2. 64 clients x 3 requests (an image + a question each): how many succeed, and the p95 latency;
  3. with --memory: the server's RSS before, at its peak and after 2 requests of 8 images that decode to 40 MP
     each (155 KB PNGs), handled under the pixel budget.

    .venv/bin/python bench/server_probes.py [--examples 300] [--memory] [--skip-schemathesis]

The last line is `failures=<schemathesis failures + failed load requests>`.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def build_model(out: Path) -> Path:
    from vlmkit.config import RecipeConfig, load_config
    from vlmkit.models.vlm import VisionLanguageModel

    recipe = load_config(RecipeConfig, ROOT / "configs" / "tiny.yaml", [])
    return Path(VisionLanguageModel.from_config(recipe.model).eval().save_pretrained(out))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "vlmkit.cli",
        "serve",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen([*cmd, "--max-tokens-limit", "16", "--no-web"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start")


def run_schemathesis(url: str, examples: int) -> int:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if exe is None:
        raise SystemExit("schemathesis is not installed (pip install 'schemathesis>=4.0')")
    cmd = [exe, "--config-file", str(ROOT / "bench" / "schemathesis.toml"), "run", f"{url}/openapi.json"]
    cmd += ["--checks", "all", "--max-examples", str(examples), "--seed", "1", "--workers", "2", "--no-color"]
    print("$", " ".join(cmd[1:]).replace(str(ROOT) + "/", ""), flush=True)
    with tempfile.TemporaryDirectory() as cwd:  # schemathesis keeps a cache of examples in its working dir
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=cwd).stdout
    summary = [line.strip() for line in out.splitlines() if re.search(r"generated|failure|passed|Seed", line)]
    print("\n".join(f"  {line}" for line in summary[-4:]))
    found = re.search(r"(\d+) generated, (\d+) passed", out)
    if found is None or found.group(1) != found.group(2):
        print(out[-6000:])
        return 1
    return 0


def png_url(size: tuple[int, int], color: tuple[int, int, int] = (90, 140, 200)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(url: str, images: list[str], text: str, timeout: float = 300) -> tuple[int, float]:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [
        {"type": "text", "text": text}
    ]
    start = time.perf_counter()
    try:
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": content}], "max_tokens": 16},
            timeout=timeout,
        )
        status = reply.status_code
    except httpx.HTTPError:
        status = 0
    return status, time.perf_counter() - start


def load_probe(url: str, clients: int = 64, rounds: int = 3) -> int:
    image = png_url((320, 240))

    def client(i: int) -> list[tuple[int, float]]:
        return [ask(url, [image], f"what is in picture {i}.{r}?") for r in range(rounds)]

    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    ok = sum(status == 200 for status, _ in results)
    latencies = sorted(t for _, t in results)
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(f"load: {clients} clients x {rounds} requests: {ok}/{len(results)} OK, p95 {p95:.2f} s")
    return len(results) - ok


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def memory_probe(url: str, pid: int) -> None:
    big = png_url((8000, 5000))  # ~155 KB that decodes to 40 MP
    print(
        f"memory: 2 requests x 8 images of {len(big) * 3 // 4 // 1024} KB decoding to 8000x5000 (40 MP) each"
    )
    before, _ = rss_mib(pid)
    with ThreadPoolExecutor(2) as pool:
        statuses = [s for s, _ in pool.map(lambda i: ask(url, [big] * 8, f"big {i}", 600), range(2))]
    time.sleep(3)
    after, peak = rss_mib(pid)
    print(
        f"memory: statuses {statuses}; RSS {before:.0f} MiB before, peak {peak:.0f} MiB, {after:.0f} MiB after"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=300, help="schemathesis cases per operation")
    parser.add_argument("--memory", action="store_true", help="also measure RSS around 16 images of 40 MP")
    parser.add_argument("--skip-schemathesis", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model")
        port = free_port()
        server = start_server(model, port)
        url = f"http://127.0.0.1:{port}"
        try:
            failures = 0 if args.skip_schemathesis else run_schemathesis(url, args.examples)
            failures += load_probe(url)
            if args.memory:
                memory_probe(url, server.pid)
            health = httpx.get(f"{url}/health", timeout=10).json()
            print(f"health after the probes: {health}")
        finally:
            server.terminate()
            server.wait(30)
    print(f"failures={failures}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
