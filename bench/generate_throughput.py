"""Generation throughput: vlmkit vs transformers Llava on identical weights, and the server's batching gain.

Builds a small random VLM (HF CLIP tower + MLP bridge + a Llama LM), exports it with `to_llava`, then measures
  1. tokens/s of `VisionLanguageModel.generate` vs `LlavaForConditionalGeneration.generate` at batch 1 and 8;
  2. `vlmkit serve` (a subprocess on 127.0.0.1) with 8 concurrent clients vs one request at a time.
Prints the ratios; the last line is `ratio=<server concurrent / sequential>`.

    .venv/bin/python bench/generate_throughput.py [--new-tokens 32] [--server-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
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


def server_throughput(model_dir: Path, new_tokens: int, clients: int = 8, rounds: int = 2) -> float:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vlmkit.cli",
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch",
        str(clients),
        "--no-web",
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
        bodies = [
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_url(i)}},
                            {"type": "text", "text": f"Describe picture {i} in detail."},
                        ],
                    }
                ],
                "max_tokens": new_tokens,
                "ignore_eos": True,
            }
            for i in range(clients)
        ]
        with httpx.Client(timeout=300) as http:

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
            batches_before = http.get(f"{url}/health").json()["batches"]
            with ThreadPoolExecutor(clients) as pool:
                cpu, start = process_cpu_seconds(proc.pid), time.perf_counter()
                tokens = sum(pool.map(ask, work))
                concurrent = tokens / (time.perf_counter() - start)
                concurrent_cpu = process_cpu_seconds(proc.pid) - cpu
            batches = http.get(f"{url}/health").json()["batches"] - batches_before
    finally:
        proc.terminate()
        proc.wait(30)
    print(
        f"server: {clients} concurrent clients {concurrent:8.1f} tok/s   one at a time {sequential:8.1f} tok/s   "
        f"ratio {concurrent / sequential:.2f}x "
        f"(server CPU time {sequential_cpu / max(concurrent_cpu, 1e-9):.2f}x; {rounds * clients} requests in "
        f"{batches} batches)"
    )
    return concurrent / sequential


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per row, generate comparison")
    parser.add_argument("--server-tokens", type=int, default=64, help="tokens per answer, server comparison")
    parser.add_argument("--repeats", type=int, default=3)
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
    ratios = compare_with_transformers(model, args.new_tokens, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model.save_pretrained(Path(tmp) / "model")
        server_ratio = server_throughput(model_dir, args.server_tokens)
    print(
        f"vlmkit/transformers: batch 1 {ratios[1]:.2f}x (goal >= 1.0), batch 8 {ratios[8]:.2f}x; "
        f"server concurrent/sequential {server_ratio:.2f}x (goal >= 3); {time.perf_counter() - start:.0f}s"
    )
    print(f"ratio={server_ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
