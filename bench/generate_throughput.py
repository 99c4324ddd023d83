"""Generation throughput: vlmkit vs transformers Llava on identical weights, and the server's batching gain.

Builds a small random VLM (HF CLIP tower + MLP bridge + a Llama LM), exports it with `to_llava`, then measures
  1. tokens/s of `VisionLanguageModel.generate` vs `LlavaForConditionalGeneration.generate` at batch 1 and 8;
  2. `vlmkit serve` (a subprocess on 127.0.0.1) with 8 concurrent clients vs one request at a time;
  3. the p95 inter-token latency of running streams while requests with long prompts keep arriving (and the
     arrivals' latency): continuous batching with chunked prefill (64, 256 tokens) vs without chunking vs windowed
     batching (`--no-continuous-batching`).
Prints the ratios; the last line is `ratio=<server concurrent / sequential>`.

    .venv/bin/python bench/generate_throughput.py [--new-tokens 32] [--server-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from vlmkit.config import BridgeConfig, LLMConfig, ModelConfig, VisionConfig
from vlmkit.models.hf_export import to_llava
from vlmkit.models.vlm import VisionLanguageModel

CLIP = {
    "model_type": "clip_vision_model",
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 224,
    "patch_size": 32,
}
LLAMA = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "initializer_range": 0.1,
}


def build_model() -> VisionLanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig.make("hf", hf_config=CLIP),
        bridge=BridgeConfig.make("mlp"),
        llm=LLMConfig.make("tiny", hf_config=LLAMA),
    )
    return VisionLanguageModel.from_config(cfg).eval()


def image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))


def timed(fn, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` (wall, process CPU) seconds after a warm-up. The minimum is the run least disturbed by
    other load; CPU time is a cross-check on a busy machine."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of another process (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def compare_with_transformers(model: VisionLanguageModel, new_tokens: int, repeats: int) -> dict[int, float]:
    llava = to_llava(model).eval()
    ratios = {}
    for batch_size in (1, 8):
        prompts = [f"<image>\nDescribe picture {i} in detail." for i in range(batch_size)]
        batch = model.prepare_prompts(prompts, [[image(i)] for i in range(batch_size)])
        hf_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        with torch.no_grad():
            ours_tokens = model.generate(**batch, max_new_tokens=new_tokens, eos_token_ids=[-1])
            hf_tokens = llava.generate(
                **hf_inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )[:, batch["input_ids"].shape[1] :]
        same = torch.equal(ours_tokens, hf_tokens)
        ours, ours_cpu = timed(
            lambda b=batch: model.generate(**b, max_new_tokens=new_tokens, eos_token_ids=[-1]), repeats
        )

        def hf(inputs=hf_inputs) -> None:
            with torch.no_grad():
                llava.generate(
                    **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
                )

        theirs, theirs_cpu = timed(hf, repeats)
        n = batch_size * new_tokens
        ratios[batch_size] = theirs / ours
        print(
            f"batch {batch_size}: vlmkit {n / ours:8.1f} tok/s   transformers {n / theirs:8.1f} tok/s   "
            f"ratio {theirs / ours:.2f}x (CPU time {theirs_cpu / ours_cpu:.2f}x)   identical tokens: {same}"
        )
    return ratios


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_url(seed: int) -> str:
    buf = io.BytesIO()
    image(seed).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@contextlib.contextmanager
def served(model_dir: Path, *extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`vlmkit serve` in a subprocess on 127.0.0.1; yields its URL and process."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vlmkit.cli",
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--no-web",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(30)


def request_body(i: int, tokens: int, text: str | None = None, stream: bool = False) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": data_url(i)}},
        {"type": "text", "text": text or f"Describe picture {i} in detail."},
    ]
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": stream,
    }


def server_throughput(model_dir: Path, new_tokens: int, clients: int = 8, rounds: int = 2) -> float:
    bodies = [request_body(i, new_tokens) for i in range(clients)]
    with served(model_dir, "--max-batch", str(clients)) as (url, proc), httpx.Client(timeout=300) as http:

        def ask(body: dict) -> int:
            reply = http.post(f"{url}/v1/chat/completions", json=body)
            reply.raise_for_status()
            return reply.json()["usage"]["completion_tokens"]

        ask(bodies[0])  # warm-up
        work = [b for _ in range(rounds) for b in bodies]
        cpu, start = process_cpu_seconds(proc.pid), time.perf_counter()
        tokens = sum(ask(b) for b in work)
        sequential = tokens / (time.perf_counter() - start)
        sequential_cpu = process_cpu_seconds(proc.pid) - cpu
        steps_before = http.get(f"{url}/health").json()["batches"]
        with ThreadPoolExecutor(clients) as pool:
            cpu, start = process_cpu_seconds(proc.pid), time.perf_counter()
            tokens = sum(pool.map(ask, work))
            concurrent = tokens / (time.perf_counter() - start)
            concurrent_cpu = process_cpu_seconds(proc.pid) - cpu
        steps = http.get(f"{url}/health").json()["batches"] - steps_before
    print(
        f"server: {clients} concurrent clients {concurrent:8.1f} tok/s   one at a time {sequential:8.1f} tok/s   "
        f"ratio {concurrent / sequential:.2f}x "
        f"(server CPU time {sequential_cpu / max(concurrent_cpu, 1e-9):.2f}x; {rounds * clients} requests in "
        f"{steps} decode steps, {rounds * clients * new_tokens / max(steps, 1):.1f} tokens per step)"
    )
    return concurrent / sequential


def stream_gaps(http: httpx.Client, url: str, body: dict) -> list[float]:
    """Seconds between consecutive content chunks of one streamed answer."""
    times = []
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:])]


def arrivals_latency(model_dir: Path, rounds: int = 2, running: int = 4, senders: int = 2) -> dict[str, dict]:
    """While `running` streams decode 128 tokens each, `senders` clients send requests with long prompts (~500
    tokens, 2 answer tokens) back to back. Reports the p95 (and max) gap between consecutive tokens of the running
    streams and the median latency of the arrivals, for continuous batching with prefill chunks of 64 and 256
    tokens, without chunking, and for windowed batching (each batch runs to its end: smooth streams, but arrivals
    wait). The servers run at once (an idle one costs nothing); the load alternates between them."""
    configs = {
        "chunk 64": ("--prefill-chunk", "64"),
        "chunk 256 (default)": ("--prefill-chunk", "256"),
        "unchunked": ("--prefill-chunk", "100000"),
        "windows": ("--no-continuous-batching",),
    }
    long_text = "Describe every part of this picture, carefully and in order. " * 45
    gaps: dict[str, list[float]] = {name: [] for name in configs}
    waits: dict[str, list[float]] = {name: [] for name in configs}
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(served(model_dir, *args))[0] for name, args in configs.items()}
        with httpx.Client(timeout=600) as http:
            for url in urls.values():
                http.post(f"{url}/v1/chat/completions", json=request_body(0, 4)).raise_for_status()
            seed = 1000
            for rnd in range(rounds):
                for name in list(configs) if rnd % 2 == 0 else list(configs)[::-1]:
                    url, done = urls[name], threading.Event()
                    streams = [request_body(seed + i, 128, stream=True) for i in range(running)]
                    seed += running

                    def send(first: int, url=url, done=done, name=name) -> None:
                        time.sleep(0.3)  # the streams are decoding by now
                        i = first
                        while not done.is_set():
                            start = time.perf_counter()
                            body = request_body(i, 2, text=f"{i}: {long_text}")
                            http.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
                            waits[name].append(time.perf_counter() - start)
                            i += senders

                    with ThreadPoolExecutor(running + senders) as pool:
                        sent = [pool.submit(send, seed + k) for k in range(senders)]
                        results = list(pool.map(lambda b, url=url: stream_gaps(http, url, b), streams))
                        done.set()
                        for future in sent:
                            future.result()
                    seed += 1000
                    gaps[name].extend(g for r in results for g in r)
    report = {}
    for name in configs:
        report[name] = {
            "itl_p95": float(np.percentile(gaps[name], 95)),
            "itl_max": max(gaps[name]),
            "arrival_p50": float(np.median(waits[name])) if waits[name] else float("nan"),
            "arrivals": len(waits[name]),
        }
        r = report[name]
        print(
            f"arrivals, {name:20s}: running streams' inter-token latency p95 {1000 * r['itl_p95']:.0f} ms, "
            f"max {1000 * r['itl_max']:.0f} ms; arrivals' latency p50 {r['arrival_p50']:.2f} s ({r['arrivals']} served)"
        )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per row, generate comparison")
    parser.add_argument("--server-tokens", type=int, default=64, help="tokens per answer, server comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server-only", action="store_true", help="skip the comparison with transformers")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    start = time.perf_counter()
    model = build_model()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"model: {params:.1f}M parameters, {model.tokens_per_image()} visual tokens per image, "
        f"{torch.get_num_threads()} torch threads"
    )
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        print(f"warning: load average {load:.1f} on {cores} cores - timings will be noisy")
    ratios = {1: float("nan"), 8: float("nan")}
    if not args.server_only:
        ratios = compare_with_transformers(model, args.new_tokens, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model.save_pretrained(Path(tmp) / "model")
        server_ratio = server_throughput(model_dir, args.server_tokens)
        arrivals = arrivals_latency(model_dir)
    print(
        f"vlmkit/transformers: batch 1 {ratios[1]:.2f}x (goal >= 1.0), batch 8 {ratios[8]:.2f}x; "
        f"server concurrent/sequential {server_ratio:.2f}x (goal >= 3); p95 inter-token latency under arrivals: "
        + ", ".join(f"{name} {1000 * r['itl_p95']:.0f} ms" for name, r in arrivals.items())
        + f"; {time.perf_counter() - start:.0f}s"
    )
    print(f"ratio={server_ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
