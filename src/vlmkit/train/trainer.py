"""The training loop: stages in order, accumulation, schedule, clipping, mixed precision, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmkit.config import RecipeConfig, StageConfig, load_yaml, save_yaml, to_dict
from vlmkit.log import get_logger
from vlmkit.memory import HeapReleaser, release_free_memory
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.precision import autocast_context
from vlmkit.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
    set_rng_state,
)
from vlmkit.train.metrics import MetricsLog, plot_run
from vlmkit.train.schedule import build_scheduler
from vlmkit.train.stages import apply_stage, merge_lora, param_groups
from vlmkit.train.step import StepSpeedup, build_optimizer, speed_up, train_step

log = get_logger(__name__)


class RunDirError(RuntimeError):
    """The run directory is not in a state the requested action can use."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stage_dir(out: Path, index: int, stage: StageConfig) -> Path:
    return out / "stages" / f"{index}-{stage.name}"


def resolve_init(path: str) -> Path:
    """A run directory (its `model/`) or a model directory."""
    p = Path(path)
    if (p / "model" / "config.json").is_file():
        return p / "model"
    if (p / "config.json").is_file():
        return p
    raise RunDirError(f"init_from '{path}' is neither a run directory with model/ nor a model directory")


@dataclass
class Progress:
    """Where training is: which stage, which optimizer step, where in the data."""

    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    epoch: int = 0
    batch_pos: int = 0  # batches of the current epoch already consumed
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Runs a recipe's stages into a run directory; `resume=True` continues from the latest checkpoint."""

    def __init__(
        self,
        recipe: RecipeConfig,
        out_dir: str | Path,
        resume: bool = False,
        strategy: Any = None,
        model: VisionLanguageModel | None = None,
        generation_hook: GenerationHook | None = None,
    ):
        """`model`: an already built stage-0 model (as `from_config(recipe.model)` would build it after seeding).
        `generation_hook(model, stage, step) -> {metric: value}` runs at each validation (single process) and
        its metrics go to metrics.jsonl; `train.eval_generation: N` installs one scoring N val records."""
        if not recipe.stages:
            raise ValueError(
                "the recipe has no stages: add a `stages:` list (e.g. [{name: align, preset: align}])"
            )
        self.recipe = recipe
        self.out = Path(out_dir)
        self.resume = resume
        from vlmkit.train.distributed import build_strategy

        self.strategy = strategy or build_strategy(recipe.train.strategy)
        self.ckpt_root = self.out / "checkpoints"
        self.metrics: MetricsLog | None = None
        self._given_model = model
        self.generation_hook = generation_hook
        if generation_hook is None and recipe.train.eval_generation > 0:
            self.generation_hook = TaskGenerationHook(recipe, self.out)
        self._pretrain_cfg = _pretrain_config(recipe)  # fails on a mistyped key before any work

    # ------------------------------------------------------------------------------------------- run
    def run(self) -> Path:
        """Train every stage; returns the directory of the final model (`RUN_DIR/model`)."""
        try:
            progress = self._start()
            if progress.stage_index == 0:
                self._pretrain_vision()
            given, self._given_model = self._given_model, None
            first = self.recipe.stages[progress.stage_index]
            if given is not None and progress.stage_index == 0 and not first.init_from:
                model = given
            else:
                model = self._model_for_stage(progress.stage_index)
            for index in range(progress.stage_index, len(self.recipe.stages)):
                stage = self.recipe.stages[index]
                if index > progress.stage_index:
                    progress = Progress(stage_index=index, global_step=progress.global_step)
                    if stage.init_from:
                        model = self._model_for_stage(index)
                model = self._run_stage(model, stage, index, progress)
            final = self.out / "model"
            if self.strategy.is_main:
                model.save_pretrained(final)
                if self.recipe.train.plot:
                    plot_run(self.out / "metrics.jsonl", self.out / "training.png")
            self.strategy.barrier()
        finally:
            if self.metrics:
                self.metrics.close()
            self.strategy.close()  # multi-process strategies destroy their process group here
        log.info("final model: %s", final)
        return final

    def _start(self) -> Progress:
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt = latest_checkpoint(self.ckpt_root)
        done_stages = [
            i for i, s in enumerate(self.recipe.stages) if (stage_dir(self.out, i, s) / "model").is_dir()
        ]
        if not self.resume and (ckpt is not None or done_stages):
            raise RunDirError(
                f"{self.out} already holds a training run; pass --resume to continue it "
                "or choose another --out"
            )
        if self.strategy.is_main:
            save_yaml(self.recipe, self.out / "config.yaml")
        tb = self.out / "tensorboard" if self.recipe.train.tensorboard and self.strategy.is_main else None
        self.metrics = MetricsLog(self.out / "metrics.jsonl", tb) if self.strategy.is_main else None
        self._resume_from = None
        if not self.resume:
            return Progress()
        if ckpt is None:
            if not done_stages:
                log.info("--resume: no checkpoint in %s yet, starting from the beginning", self.out)
                return Progress()
            nxt = done_stages[-1] + 1
            log.info("--resume: stages up to %d complete; continuing with stage %d", done_stages[-1], nxt)
            step = self._last_logged_step()
            if self.metrics:
                self.metrics.truncate_after(step)
            return Progress(stage_index=nxt, global_step=step)
        state = read_state(ckpt)
        self._resume_from = ckpt
        log.info(
            "--resume: continuing from %s (stage %d, step %d)", ckpt, state["stage_index"], state["step"]
        )
        if self.metrics:
            self.metrics.truncate_after(state["step"])
        return Progress(
            state["stage_index"], state["stage_step"], state["step"], state["epoch"], state["batch_pos"]
        )

    def _last_logged_step(self) -> int:
        from vlmkit.train.metrics import read_metrics

        rows = read_metrics(self.out / "metrics.jsonl")
        return max((r.get("step", 0) for r in rows), default=0)

    # ----------------------------------------------------------------------------------------- model
    def _pretrain_vision(self) -> None:
        """Contrastive tower pretraining (once per run directory); the stages then start from its weights."""
        if self._pretrain_cfg is None:
            return
        from vlmkit.train.data import prepare_data
        from vlmkit.train.pretrain_vision import pretrain_vision

        out = self.out / "vision-pretrain"
        if self.strategy.is_main:
            cfg = self._pretrain_cfg
            if cfg.data is None:
                data = prepare_data(self.recipe.data, self.out)
                cfg = dataclasses.replace(cfg, data=data.train, image_root=cfg.image_root or data.image_root)
            done = (out / "vision.safetensors").is_file()
            saved = out / "pretrain_config.yaml"
            if done and saved.is_file() and load_yaml(saved) != to_dict(cfg):
                # a resumed run keeps the tower its checkpoints were trained with
                action = "--resume keeps it" if self.resume else "pretraining again"
                log.warning("%s was pretrained with other settings than the recipe's: %s", out, action)
                done = self.resume
            if not done:
                log.info("pretraining the vision tower (%s) into %s", cfg.vision.kind, out)
                pretrain_vision(cfg, out)
        self.strategy.barrier()
        self.recipe.model.vision.path = str(out)
        if self._given_model is not None:
            self._given_model.vision.load_weights(out)

    def _model_for_stage(self, index: int) -> VisionLanguageModel:
        """Stage 0: `init_from` or the recipe's model; later stages: the previous stage's saved model."""
        stage = self.recipe.stages[index]
        seed_everything(self.recipe.train.seed)
        if stage.init_from:
            path = resolve_init(stage.init_from)
            log.info("stage '%s' starts from %s", stage.name, path)
            return VisionLanguageModel.from_pretrained(path).train()
        if index > 0:
            prev = stage_dir(self.out, index - 1, self.recipe.stages[index - 1]) / "model"
            if prev.is_dir():
                return VisionLanguageModel.from_pretrained(prev).train()
        return VisionLanguageModel.from_config(self.recipe.model).train()

    # ----------------------------------------------------------------------------------------- stage
    def _run_stage(
        self, model: VisionLanguageModel, stage: StageConfig, index: int, progress: Progress
    ) -> VisionLanguageModel:
        from rich.console import Console

        from vlmkit.models.summary import parts_table
        from vlmkit.train.data import StageData

        cfg = self.recipe.train
        apply_stage(model, stage)
        if self.strategy.is_main:
            Console(stderr=True).print(
                parts_table(model, title=f"stage {index} '{stage.name}' ({stage.preset})")
            )
        if cfg.gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        data = StageData.build(self.recipe, stage, model, self.out, self.strategy)
        total = stage.max_steps or max(1, math.ceil(stage.epochs * data.steps_per_epoch))
        rest = None
        if self._resume_from is not None:  # full weights go into the plain model, before any sharding
            _, rest = load_checkpoint(self._resume_from, model)
        sharded = _shards_parameters(self.strategy)
        speedup = speed_up(model, cfg, getattr(self.strategy, "device", torch.device("cpu")), sharded)
        wrapped = self.strategy.wrap(model)
        # grouped after wrapping: FSDP replaces the parameters by sharded ones (same names, same order)
        optimizer = build_optimizer(param_groups(model, stage), sharded)
        scheduler = build_scheduler(optimizer, stage.schedule, total, stage.warmup_ratio)
        if rest is not None:
            self.strategy.load_optimizer(optimizer, rest["optimizer"], model)
            scheduler.load_state_dict(rest["scheduler"])
            set_rng_state(rest["rng"])
            self._resume_from = None
        else:
            seed_everything(cfg.seed + 1000 * index)
        log.info(
            "stage '%s': %d optimizer steps of %d x %d samples (%d train samples)",
            stage.name,
            total,
            stage.batch_size,
            stage.grad_accum,
            data.num_samples,
        )
        autocast = autocast_context(cfg.precision)
        bar = _progress_bar(self.strategy.is_main)
        task = bar.add_task(
            stage.name, total=total, completed=progress.stage_step, loss=float("nan"), lr=0.0, tps=0.0
        )
        window_start, window_tokens = time.perf_counter(), 0
        first_step = progress.stage_step

        def next_batch() -> dict[str, Any]:
            batch, progress.epoch, progress.batch_pos = data.next_batch(progress.epoch, progress.batch_pos)
            return batch

        release_free_memory()  # what loading and data preparation left in the C heap
        heap = HeapReleaser()  # later: only when the heap grew past the steps' working set
        with bar:
            while progress.stage_step < total:
                model.train()
                step = train_step(
                    wrapped,
                    model,
                    next_batch,
                    optimizer,
                    scheduler,
                    self.strategy,
                    autocast,
                    stage.grad_accum,
                    stage.max_grad_norm,
                )
                heap.step_done()
                grad_norm, tokens, samples = step.grad_norm, step.tokens, step.samples
                progress.stage_step += 1
                progress.global_step += 1
                loss = self.strategy.mean(step.loss)
                window_tokens += tokens
                elapsed = time.perf_counter() - window_start
                lr = optimizer.param_groups[0]["lr"]
                record = {
                    "step": progress.global_step,
                    "stage": stage.name,
                    "stage_step": progress.stage_step,
                    "epoch": progress.epoch,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens": tokens,
                    "samples": samples,
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                }
                if self.metrics and (
                    progress.stage_step % cfg.log_every == 0 or progress.stage_step == total
                ):
                    self.metrics.write(record)
                bar.update(task, advance=1, loss=loss, lr=lr, tps=record["tokens_per_s"])
                if (
                    not bar.console.is_terminal
                    and self.strategy.is_main
                    and (progress.stage_step % max(1, total // 20) == 0 or progress.stage_step == total)
                ):  # no live bar (CI, nohup): a log line every 5% instead
                    done = progress.stage_step - first_step
                    eta = elapsed / max(done, 1) * (total - progress.stage_step)
                    log.info(
                        "%s step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  ETA %.0f s",
                        stage.name,
                        progress.stage_step,
                        total,
                        loss,
                        lr,
                        record["tokens_per_s"],
                        eta,
                    )
                if (
                    cfg.eval_every
                    and progress.stage_step % cfg.eval_every == 0
                    and progress.stage_step < total
                ):
                    self._validate(wrapped, data, stage, progress, autocast, speedup)
                if (
                    cfg.save_every
                    and progress.stage_step % cfg.save_every == 0
                    and progress.stage_step < total
                ):
                    self._checkpoint(model, optimizer, scheduler, index, progress)
        self._validate(wrapped, data, stage, progress, autocast, speedup)
        del wrapped, optimizer
        model = self.strategy.unwrap(model)  # FSDP: a plain model holding the gathered full weights
        speedup.undo()  # frozen weights in their own dtype again (bf16-rounded values), plain layers
        merge_lora(model)
        record_processor(model, self.recipe)
        for p in model.parameters():
            p.requires_grad_(False)
        if self.strategy.is_main:
            model.save_pretrained(stage_dir(self.out, index, stage) / "model")
            self._checkpoint_cleanup()
        self.strategy.barrier()
        return model

    def _validate(
        self,
        model: Any,
        data: Any,
        stage: StageConfig,
        progress: Progress,
        autocast: Any,
        speedup: StepSpeedup | None = None,
    ) -> None:
        batches = data.val_batches(self.recipe.train.val_batches)
        if not batches:
            return
        model.eval()
        total_loss, total_tokens = 0.0, 0
        with torch.no_grad(), autocast:
            for batch in batches:
                out = model(**batch, return_logits=False)
                n = int((batch["labels"][:, 1:] != -100).sum())
                total_loss += float(out.loss) * n
                total_tokens += n
        model.train()
        # token-weighted over all ranks' shards (a ratio of the summed loss and token counts)
        val = self.strategy.mean(total_loss) / max(self.strategy.mean(total_tokens), 1e-9)
        log.info("stage '%s' step %d: val_loss %.4f", stage.name, progress.stage_step, val)
        if self.metrics:
            self.metrics.write({"step": progress.global_step, "stage": stage.name, "val_loss": val})
        if self.generation_hook is not None and self.strategy.world == 1:
            inner = self.strategy.unwrap(model).eval()
            full = speedup.full_precision() if speedup is not None else nullcontext()
            with torch.no_grad(), full:  # the hook generates without autocast: weights in their dtype
                scores = self.generation_hook(inner, stage, progress.global_step)
            model.train()
            log.info(
                "stage '%s' step %d: %s",
                stage.name,
                progress.stage_step,
                "  ".join(f"{k} {v:.3f}" for k, v in scores.items()),
            )
            if self.metrics:
                self.metrics.write(
                    {
                        "step": progress.global_step,
                        "stage": stage.name,
                        **{f"gen_{k}": v for k, v in scores.items()},
                    }
                )

    def _checkpoint(self, model: Any, optimizer: Any, scheduler: Any, index: int, progress: Progress) -> None:
        weights, optim_state = self.strategy.gather_state(model, optimizer)
        if self.strategy.is_main:
            state = {
                "stage_index": index,
                "stage_step": progress.stage_step,
                "epoch": progress.epoch,
                "batch_pos": progress.batch_pos,
                "stage": self.recipe.stages[index].name,
            }
            path = save_checkpoint(
                self.ckpt_root,
                progress.global_step,
                model,
                optimizer,
                scheduler,
                state,
                self.recipe.train.keep_last,
                weights=weights,
                optimizer_state=optim_state,
            )
            log.debug("checkpoint %s", path)
        self.strategy.barrier()

    def _checkpoint_cleanup(self) -> None:
        """After a stage's model is saved, its mid-stage checkpoints are no longer needed for resume."""
        import shutil

        if self.ckpt_root.is_dir():
            shutil.rmtree(self.ckpt_root)


GenerationHook = Callable[[VisionLanguageModel, StageConfig, int], dict[str, float]]


class TaskGenerationHook:
    """Generates answers for the first N validation records and scores them by task (ShapesWorld-style
    records with `task` / `answer` / `meta`): a generation metric next to the validation loss."""

    def __init__(self, recipe: RecipeConfig, run_dir: Path) -> None:
        self.recipe, self.run_dir = recipe, run_dir

    def __call__(self, model: VisionLanguageModel, stage: StageConfig, step: int) -> dict[str, float]:
        import json

        from vlmkit.eval.shapesworld import evaluate_shapesworld
        from vlmkit.train.data import prepare_data

        data = prepare_data(self.recipe.data, self.run_dir)
        source = stage.val_file or data.val
        if not source:
            return {}
        subset = self.run_dir / "eval-generation" / "val-subset.json"
        if not subset.is_file():
            subset.parent.mkdir(parents=True, exist_ok=True)
            records = json.loads(Path(source).read_text())[: self.recipe.train.eval_generation]
            subset.write_text(json.dumps(records))
        image_root = data.image_root or str(Path(source).parent)
        scores = evaluate_shapesworld(model.eval(), subset, image_root, batch_size=16, max_new_tokens=48)
        return {k: float(v) for k, v in scores.items() if not k.startswith("n_") and v is not None}


def _pretrain_config(recipe: RecipeConfig) -> Any:
    """The recipe's `pretrain_vision` section as a validated PretrainVisionConfig on the recipe's tower."""
    if recipe.pretrain_vision is None:
        return None
    from vlmkit.config import from_dict
    from vlmkit.train.pretrain_vision import PretrainVisionConfig

    if recipe.model.vision.kind != "vit":
        raise ValueError(
            f"pretrain_vision trains the project's `vit` tower, not '{recipe.model.vision.kind}'"
        )
    cfg = from_dict(PretrainVisionConfig, dict(recipe.pretrain_vision), "pretrain_vision")
    vision = dataclasses.replace(recipe.model.vision, path=None)
    return dataclasses.replace(cfg, vision=vision)


def record_processor(model: VisionLanguageModel, recipe: RecipeConfig) -> None:
    """Copy the data settings that shape prompts and images into the model config (saved with the model)."""
    data, proc = recipe.data, model.cfg.processor
    proc.template, proc.system_prompt = data.template, data.system_prompt
    proc.resize, proc.anyres_grid = data.resize, [list(x) for x in data.anyres_grid]
    if data.synthetic is not None:
        proc.grounding_format = data.synthetic.grounding_format


def _enable_gradient_checkpointing(model: VisionLanguageModel) -> None:
    """Activation checkpointing of the LLM's decoder layers and of the vision tower's blocks."""
    inner = model.llm.model
    if hasattr(inner, "gradient_checkpointing_enable"):
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(inner, "enable_input_require_grads"):
            inner.enable_input_require_grads()
    model.vision.enable_gradient_checkpointing()


def _shards_parameters(strategy: Any) -> bool:
    """True for FSDP, whose units hold sharded (DTensor) parameters of one dtype."""
    from vlmkit.train.parallel import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def _progress_bar(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("lr {task.fields[lr]:.2e}"),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def train(recipe: RecipeConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Library entry point of `vlmkit train`."""
    return Trainer(recipe, out_dir, resume=resume).run()
