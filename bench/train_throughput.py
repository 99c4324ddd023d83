"""Training throughput: vlmkit (packing + length grouping) against a LLaVA-style padded loop, and the
frozen-tower feature cache against decoding + tower forward every step.

Part 1, packing. Same model, same data, same tokens per optimizer step, one process:
  * data: ShapesWorld (`generate_shapesworld`) turned into mixed-length instruction data. Three generations
    with the same seed and task order permuted render byte-identical images with different random questions;
    each sample is a multi-turn conversation about one image (1 turn for ~40% of samples, 2-6 for ~40%,
    7-14 for ~20%: a long tail like LLaVA-Instruct's), so lengths span ~45..~530 tokens.
  * model: SmallViT 64 px (64 patches, avg-pooled 2x2 in the bridge -> 16 visual tokens) + MLP bridge + a
    random Llama of SmolLM2-135M's width (hidden 576, 9 heads / 3 KV heads, MLP 1536) with 3 layers and the
    tiny BPE tokenizer (a small vocabulary, so the LM head does not dominate). Instruct stage: bridge + LLM
    train, tower frozen; fp32, AdamW.
  * baseline (LLaVA-style): a random permutation, micro-batches of B samples, `Collator` right-padding to
    the longest sample of the micro-batch, no packing.
  * vlmkit: `LengthGroupedSampler` order, micro-batches of the same B samples, `PackingCollator` packing
    them first-fit into rows of `max_length` tokens (attention kept within each sample).
  * equal tokens per optimizer step: both loops run the same number of optimizer steps of `accum`
    micro-batches of B samples each over the same N samples (one epoch, drop-last) - every optimizer step
    takes G = B * accum samples and both loops see exactly the same samples, hence the same real tokens, in
    total. Only the order and the padding differ. Throughput counts real (non-pad) tokens only.

Part 2, feature cache. LLaVA stage 1 (`align`: bridge trains, tower and LLM frozen) on the caption records:
a random CLIP-style HF tower at 224 px (hidden 384, 6 layers, patch 16 -> 196 patches, pooled 2x2 -> 49
visual tokens) + the same LLM. Uncached: every step decodes the PNGs and runs the tower; cached: the
features come from `maybe_feature_cache` shards (its one-time precompute is timed separately).

Timing: the two loops of each part alternate step by step in one process, so that load from other processes
hits both alike; one torch thread by default, because on a small shared machine OpenMP threads that wait for a
descheduled sibling distort step times (most for the loop with fewer, fuller rows); `--threads 2` uses both
cores of an idle machine.

Run: `python bench/train_throughput.py [--quick]`. The last line is `ratio=<packed/baseline>` (tokens/s).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import (
    BridgeConfig,
    DataConfig,
    LLMConfig,
    ModelConfig,
    StageConfig,
    VisionConfig,
)
from vlmkit.data.collate import Collator, LengthGroupedSampler, PackingCollator, model_inputs
from vlmkit.data.dataset import VLMDataset
from vlmkit.models.vision import ViTConfig
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.shapesworld.world import ALL_TASKS, generate_shapesworld
from vlmkit.train.data import StageData
from vlmkit.train.feature_cache import maybe_feature_cache
from vlmkit.train.stages import apply_stage

LLM_WIDTH = {  # SmolLM2-135M's width, fewer layers
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 3,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
}
DATA_MAX_LENGTH = 1024  # no sample is truncated
CLIP_224 = {
    "model_type": "clip_vision_model",
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "image_size": 224,
    "patch_size": 16,
}


# ------------------------------------------------------------------------------------------------ data
def build_data(root: Path, n_scenes: int, n_captions: int, seed: int = 0) -> tuple[Path, Path]:
    """ShapesWorld -> (multi-turn instruction file, caption file of the first `n_captions` scenes); LLaVA JSON."""
    turns: dict[str, list[dict[str, Any]]] = defaultdict(list)
    image: dict[str, str] = {}
    captions = []
    for variant in range(3):
        tasks = ALL_TASKS[variant:] + ALL_TASKS[:variant]  # same scenes, other random questions
        out = root / f"v{variant}"
        files = generate_shapesworld(out, n_scenes, seed=seed, image_size=96, tasks=tasks)
        for rec in json.loads(files["train"].read_text()):
            scene = rec["meta"]["scene_id"]
            image[scene] = str(root / "v0" / rec["image"])  # byte-identical across the variants
            qa = (rec["conversations"][0]["value"].replace("<image>\n", ""), rec["conversations"][1]["value"])
            if qa not in turns[scene]:
                turns[scene].append(qa)
            if variant == 0 and rec["task"] == "caption":
                captions.append({**rec, "image": image[scene]})
    rng = random.Random(seed)
    records = []
    for scene, qas in sorted(turns.items()):
        u = rng.random()
        k = 1 if u < 0.4 else rng.randint(2, 6) if u < 0.8 else rng.randint(7, 14)
        picked = rng.sample(qas, min(k, len(qas)))
        conv = []
        for i, (q, a) in enumerate(picked):
            conv += [
                {"from": "human", "value": ("<image>\n" if i == 0 else "") + q},
                {"from": "gpt", "value": a},
            ]
        records.append({"id": f"{scene}-x{len(picked)}", "image": image[scene], "conversations": conv})
    instruct, caption = root / "instruct.json", root / "captions.json"
    instruct.write_text(json.dumps(records))
    caption.write_text(json.dumps(captions[:n_captions]))
    return instruct, caption


def instruct_model() -> VisionLanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig.make(
            "vit", image_size=64, vit=ViTConfig(dim=128, depth=3, heads=4, patch_size=8)
        ),
        bridge=BridgeConfig.make("mlp", reduce="pool", reduce_factor=2),
        llm=LLMConfig.make("tiny", hf_config=LLM_WIDTH),
    )
    model = VisionLanguageModel.from_config(cfg).train()
    apply_stage(model, StageConfig(name="instruct", preset="instruct"))
    return model


def align_model() -> VisionLanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig.make("hf", hf_config=CLIP_224),
        bridge=BridgeConfig.make("mlp", reduce="pool", reduce_factor=2),
        llm=LLMConfig.make("tiny", hf_config=LLM_WIDTH),
    )
    model = VisionLanguageModel.from_config(cfg).train()
    apply_stage(model, StageConfig(name="align", preset="align"))
    return model


# ------------------------------------------------------------------------------------------------ loops
class Loop:
    """One training loop: its own model copy and AdamW; `step()` runs (and times) one optimizer step of
    `accum` micro-batches, `batches(i)` building micro-batch i (data time included)."""

    def __init__(
        self, model: VisionLanguageModel, batches: Callable[[int], dict[str, Any]], accum: int = 1
    ) -> None:
        self.model, self.batches, self.accum = copy.deepcopy(model), batches, accum
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.stats = {"seconds": 0.0, "samples": 0, "tokens": 0, "positions": 0, "loss": 0.0, "steps": 0}
        self.model(**model_inputs(self.batches(0))).loss.backward()  # warm-up, untimed, no optimizer step
        self.model.zero_grad(set_to_none=True)

    def step(self) -> None:
        start = time.perf_counter()
        for micro in range(self.accum):
            batch = self.batches(self.stats["steps"] * self.accum + micro)
            out = self.model(**model_inputs(batch))
            (out.loss / self.accum).backward()
            index = batch.get("sample_index")  # packed: -1 on padding; padded: the attention mask
            real = (index >= 0).sum() if index is not None else batch["attention_mask"].sum()
            self.stats["tokens"] += int(real)
            self.stats["positions"] += batch["input_ids"].numel()
            self.stats["samples"] += batch["n_samples"]
            self.stats["loss"] += float(out.loss.detach()) / self.accum
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.stats["seconds"] += time.perf_counter() - start
        self.stats["steps"] += 1


def interleave(loops: Sequence[Loop], steps: int) -> list[dict[str, float]]:
    """Run the loops' steps alternately (A B A B ...), so that load on a shared machine hits both alike."""
    for _ in range(steps):
        for loop in loops:
            loop.step()
    return [{**lp.stats, "loss": lp.stats["loss"] / max(lp.stats["steps"], 1)} for lp in loops]


def micro_batches(
    dataset: VLMDataset, order: Sequence[int], size: int, collate: Callable[[list[dict]], dict]
) -> Callable[[int], dict[str, Any]]:
    def build(i: int) -> dict[str, Any]:
        items = [dataset[j] for j in order[i * size : (i + 1) * size]]
        return {**collate(items), "n_samples": len(items)}

    return build


def bench_packing(instruct: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    model = instruct_model()
    cfg = DataConfig(max_length=DATA_MAX_LENGTH)
    dataset = VLMDataset.from_config(cfg, instruct, model.processor)
    lengths = dataset.lengths
    size, accum = args.micro_batch, args.accum
    steps = len(dataset) // (size * accum)
    print(
        f"data: {len(dataset)} samples, tokens min/median/max {min(lengths)}/{sorted(lengths)[len(lengths) // 2]}"
        f"/{max(lengths)}; {steps} optimizer steps of {accum} x {size} samples"
    )
    pad = model.tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(0)
    random_order = torch.randperm(len(dataset), generator=gen).tolist()
    grouped_order = LengthGroupedSampler(lengths, size * accum, seed=0).indices()
    base = Loop(model, micro_batches(dataset, random_order, size, Collator(pad, "right")), accum)
    pack = Loop(
        model, micro_batches(dataset, grouped_order, size, PackingCollator(pad, args.pack_length)), accum
    )
    return interleave([base, pack], steps)


def bench_cache(captions: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    model = align_model()
    cfg = DataConfig(max_length=DATA_MAX_LENGTH)
    pad = model.tokenizer.pad_token_id

    def stage_data() -> StageData:
        train = VLMDataset.from_config(cfg, captions, model.processor)
        return StageData(train, None, Collator(pad, "right"), args.micro_batch, seed=0, group_by_length=False)

    def batches(data: StageData) -> Callable[[int], dict[str, Any]]:
        def build(i: int) -> dict[str, Any]:
            out, _, _ = data.next_batch(0, i % data.steps_per_epoch)
            return {**out, "n_samples": len(out["sample_ids"])}

        return build

    uncached, cached = stage_data(), stage_data()
    start = time.perf_counter()
    cached.feature_cache = maybe_feature_cache(model, cached, run_dir, cfg)
    precompute = time.perf_counter() - start
    assert cached.feature_cache is not None
    loops = [Loop(model, batches(uncached)), Loop(model, batches(cached))]
    steps = min(args.cache_steps, uncached.steps_per_epoch)
    plain, fast = interleave(loops, steps)
    return {
        "precompute_s": precompute,
        "images": len(cached.train),
        "steps": steps,
        "uncached": plain,
        "cached": fast,
    }


# ------------------------------------------------------------------------------------------------ main
def _row(name: str, s: dict[str, float]) -> str:
    fill = s["tokens"] / max(s["positions"], 1)
    return (
        f"{name:<26}{s['samples'] / s['seconds']:>10.2f}{s['tokens'] / s['seconds']:>11.0f}"
        f"{s['seconds']:>9.1f}{fill:>9.0%}{s['loss']:>8.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer scenes and steps (~1 minute)")
    parser.add_argument("--scenes", type=int, default=0, help="ShapesWorld scenes (default 96; quick: 48)")
    parser.add_argument("--micro-batch", type=int, default=16, help="samples per micro-batch (both loops)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--pack-length", type=int, default=512, help="packed row length (max_length)")
    parser.add_argument(
        "--cache-steps", type=int, default=0, help="timed stage-1 steps (default 4; quick: 2)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: stable timings on a shared machine)"
    )
    args = parser.parse_args(argv)
    args.scenes = args.scenes or (48 if args.quick else 96)
    args.cache_steps = args.cache_steps or (2 if args.quick else 4)
    torch.set_num_threads(args.threads)
    logging.getLogger("vlmkit").setLevel(logging.WARNING)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlmkit-bench-") as tmp:
        root = Path(tmp)
        instruct, captions = build_data(root / "data", args.scenes, 32 if args.quick else 48)
        base, pack = bench_packing(instruct, args)
        cache = bench_cache(captions, root / "run", args)
    header = f"{'loop':<26}{'samples/s':>10}{'tokens/s':>11}{'seconds':>9}{'fill':>9}{'loss':>8}"
    print(f"\n== instruct: packing vs LLaVA-style padding (torch threads: {torch.get_num_threads()})")
    print(header)
    print(_row("baseline (random, pad)", base))
    print(_row("vlmkit (grouped, packed)", pack))
    ratio = (pack["tokens"] / pack["seconds"]) / (base["tokens"] / base["seconds"])
    print(
        f"packed/baseline tokens/s: {ratio:.2f}x (goal >= 2x); same real tokens: {pack['tokens'] == base['tokens']}"
    )
    print(f"\n== stage 1 (align, CLIP-style tower 224 px): feature cache, {cache['steps']} timed steps")
    print(header)
    print(_row("uncached (decode + tower)", cache["uncached"]))
    print(_row("cached (features)", cache["cached"]))
    speedup = cache["uncached"]["seconds"] / cache["cached"]["seconds"]
    per_image_saved = (cache["uncached"]["seconds"] - cache["cached"]["seconds"]) / cache["cached"]["samples"]
    print(
        f"cached/uncached speed: {speedup:.2f}x (goal >= 1.5x); one-time precompute {cache['precompute_s']:.1f} s "
        f"for {cache['images']} images (pays for itself after "
        f"{cache['precompute_s'] / max(per_image_saved * cache['images'], 1e-9):.2f} epochs)"
    )
    print(f"total bench time {time.perf_counter() - start:.0f} s")
    print(f"ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
