"""The training loop: stages in order, accumulation, schedule, clipping, mixed precision, checkpoints, resume.

Over 400 lines: the stage loop with exact resume (where a run starts again, checkpoints, validation lines,
metrics trimming) is one state machine; the step itself lives in train/step.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from vlmkit.config import RecipeConfig, StageConfig, from_dict, load_yaml, save_yaml
from vlmkit.faults import kill_point
from vlmkit.io import atomic_write_json, replace_dir, temp_dir_for
from vlmkit.log import get_logger
from vlmkit.memory import HeapReleaser, release_free_memory
from vlmkit.models.detection import HEAD_WEIGHTS, DetectionHead
from vlmkit.models.hf_compat import enable_activation_checkpointing
from vlmkit.models.summary import parts_table
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.models.word_bridges import uses_detector
from vlmkit.precision import autocast_context
from vlmkit.train import pretrain_vision  # noqa: F401  (registers the `vision_pretrain` objective)
from vlmkit.train.checkpoint import (
    complete_checkpoints,
    find_resume_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
    set_rng_state,
)
from vlmkit.train.data import StageData, prepare_data
from vlmkit.train.hooks import GENERATION_HOOKS, GenerationHook
from vlmkit.train.loop import run_loop
from vlmkit.train.metrics import MetricsLog, plot_run, read_metrics
from vlmkit.train.objectives import (
    CHECKPOINTS,
    DONE_FILE,
    OBJECTIVES,
    ObjectiveConfig,
    cpu_threads,
    run_objective,
)
from vlmkit.train.schedule import build_scheduler
from vlmkit.train.stages import apply_stage, check_requirements, merge_lora, param_groups
from vlmkit.train.step import StepSpeedup, build_optimizer, speed_up, train_step
from vlmkit.train.strategies import build_strategy

log = get_logger(__name__)

PRETRAIN_DIR = "vision-pretrain"  # the tower's pretraining: its saved tower, head and checkpoints
STAGE_DONE = "done.json"  # stages/I-NAME/done.json: the global step at the stage's end (with its model/)


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
        check_requirements(recipe)  # e.g. QLoRA without CUDA: refused before any work
        self.recipe = recipe
        self.out = Path(out_dir)
        self.resume = resume

        self.strategy = strategy or build_strategy(recipe.train.strategy)
        self.ckpt_root = self.out / "checkpoints"
        self.metrics: MetricsLog | None = None
        self._given_model = model
        self.generation_hook = generation_hook
        if generation_hook is None and recipe.train.eval_generation > 0:
            self.generation_hook = GENERATION_HOOKS.get(recipe.train.eval_hook)(recipe, self.out)
        self._pretrain_cfg = _pretrain_config(recipe)  # fails on a mistyped key before any work

    # ------------------------------------------------------------------------------------------- run
    def run(self) -> Path:
        """Train every stage; returns the directory of the final model (`RUN_DIR/model`)."""
        final = self.out / "model"
        try:
            progress = self._start()
            if progress.stage_index == len(self.recipe.stages):
                self._finish_complete_run(final)
                return final
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
        """Where to begin: nothing (a new run), or with `--resume` the newest checkpoint that verifies, else the
        start of the first stage without a saved model. metrics.jsonl is cut back to that point."""
        self.out.mkdir(parents=True, exist_ok=True)
        ends = self._finished_stages()
        pretrain_ckpts = complete_checkpoints(self.out / PRETRAIN_DIR / CHECKPOINTS)
        if not self.resume and (
            ends or complete_checkpoints(self.ckpt_root) or pretrain_ckpts or (self.out / "model").exists()
        ):
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
        if self.strategy.is_main:
            _remove_leftovers(self.out)
        index, step = len(ends), (ends[-1] if ends else 0)
        if index == len(self.recipe.stages):
            return Progress(stage_index=index, global_step=step)
        ckpt = self._checkpoint_to_resume(index)
        if ckpt is None:
            where = f"after stage {index - 1}, at step {step}" if index else "from the beginning"
            log.info("--resume: no usable checkpoint of stage %d; starting it %s", index, where)
            if self.metrics:
                self.metrics.truncate_after(step)
            return Progress(stage_index=index, global_step=step)
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

    def _checkpoint_to_resume(self, index: int) -> Path | None:
        """The newest checkpoint that verifies, if it is one of stage `index` (the first unfinished stage); each
        damaged newer one is named in a warning. Checkpoints of a finished stage (a kill before their cleanup)
        are removed."""
        ckpt, problems = find_resume_checkpoint(self.ckpt_root)
        if self.strategy.is_main:
            for problem in problems:
                log.warning("--resume: skipping %s", problem)
        if ckpt is None:
            return None
        of = read_state(ckpt)["stage_index"]
        if of > index:
            stage = self.recipe.stages[index]
            raise RunDirError(
                f"--resume: checkpoint {ckpt} is of stage {of}, but stage {index} '{stage.name}' has no "
                f"saved model in {stage_dir(self.out, index, stage)}"
            )
        if of < index:
            log.info("--resume: %s is a checkpoint of the finished stage %d: ignoring it", ckpt, of)
            self.strategy.barrier()  # every process has read the checkpoints before they go
            if self.strategy.is_main:
                self._checkpoint_cleanup()
            return None
        if problems and self.strategy.is_main:
            log.warning("--resume: falling back to %s, the newest checkpoint that verifies", ckpt)
        return ckpt

    def _finished_stages(self) -> list[int]:
        """The global step at the end of each finished stage, from stage 0 up to the first unfinished one. A stage
        is finished when its model is saved (an atomic rename; `done.json` is written just before it)."""
        ends: list[int] = []
        for index, stage in enumerate(self.recipe.stages):
            where = stage_dir(self.out, index, stage)
            if not (where / "model" / "config.json").is_file():
                break
            try:
                ends.append(int(json.loads((where / STAGE_DONE).read_text())["global_step"]))
            except (OSError, ValueError, KeyError, TypeError):  # a run of an older vlmkit: from the metrics
                rows = read_metrics(self.out / "metrics.jsonl")
                steps = [r["step"] for r in rows if "loss" in r and r.get("stage") == stage.name]
                ends.append(max(steps, default=ends[-1] if ends else 0))
        return ends

    def _finish_complete_run(self, final: Path) -> None:
        """`--resume` when every stage is done: write the final model if a kill cut its save, else nothing."""
        if self.strategy.is_main:
            if (final / "config.json").is_file():
                log.info(
                    "--resume: the run in %s is complete (final model: %s); nothing to do", self.out, final
                )
            else:
                index = len(self.recipe.stages) - 1
                last = stage_dir(self.out, index, self.recipe.stages[index]) / "model"
                log.info("--resume: every stage is done; writing the final model %s from %s", final, last)
                tmp = temp_dir_for(final)
                shutil.copytree(last, tmp, dirs_exist_ok=True)
                replace_dir(tmp, final)
            if self.recipe.train.plot and not (self.out / "training.png").is_file():
                plot_run(self.out / "metrics.jsonl", self.out / "training.png")
        self.strategy.barrier()

    # ----------------------------------------------------------------------------------------- model
    def _pretrain_vision(self) -> None:
        """The tower's pretraining objective (once per run directory; checkpoints in vision-pretrain/checkpoints,
        resumed exactly with --resume); the stages then start from its weights. The Trainer loads no LLM for it."""
        if self._pretrain_cfg is None:
            return

        out = self.out / PRETRAIN_DIR
        if self.strategy.is_main:
            cfg = self._pretrain_cfg
            if cfg.data is None:
                data = prepare_data(self.recipe.data, self.out)
                cfg = dataclasses.replace(cfg, data=data.train, image_root=cfg.image_root or data.image_root)
            # pretrain_config.yaml is written last: without it a kill cut the pretraining (--resume continues it)
            saved = out / DONE_FILE
            done = (out / "vision.safetensors").is_file() and saved.is_file()
            if done and not _same_config(saved, cfg):
                # a resumed run keeps the tower its checkpoints were trained with
                action = "--resume keeps it" if self.resume else "pretraining again"
                log.warning("%s was pretrained with other settings than the recipe's: %s", out, action)
                done = self.resume
            if done:
                shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # a kill just before their removal
            else:
                log.info("pretraining the vision tower (%s: %s) into %s", cfg.objective, cfg.vision.kind, out)
                with cpu_threads(cfg.threads):
                    objective = OBJECTIVES.get(cfg.objective)(cfg)
                    run_objective(objective, out, resume=self.resume, progress=True, name="pretrain-vision")
                del objective
                release_free_memory()  # the pretraining's data and activations, before the LLM's stages
        self.strategy.barrier()
        self.recipe.model.vision.path = str(out)
        if self._given_model is not None:
            self._given_model.vision.load_weights(out)
        _use_pretrained_detector(self.recipe, out, self._given_model)

    def _model_for_stage(self, index: int) -> VisionLanguageModel:
        """Stage 0: `init_from` or the recipe's model; later stages: the previous stage's saved model."""
        stage = self.recipe.stages[index]
        seed_everything(self.recipe.train.seed)
        if stage.init_from:
            path = resolve_init(stage.init_from)
            log.info("stage '%s' starts from %s", stage.name, path)
            model = VisionLanguageModel.from_pretrained(path)
        elif index > 0 and (prev := self._stage_model_dir(index - 1)).is_dir():
            model = VisionLanguageModel.from_pretrained(prev)
        else:
            return VisionLanguageModel.from_config(self.recipe.model).train()
        # the recipe decides how its data becomes model inputs (and so how the trained model is prompted)
        model.cfg.processor = dataclasses.replace(self.recipe.model.processor)
        return model.train()

    def _stage_model_dir(self, index: int) -> Path:
        return stage_dir(self.out, index, self.recipe.stages[index]) / "model"

    # ----------------------------------------------------------------------------------------- stage
    def _run_stage(
        self, model: VisionLanguageModel, stage: StageConfig, index: int, progress: Progress
    ) -> VisionLanguageModel:

        cfg = self.recipe.train
        kill_point("stage_start")
        # seeded before LoRA, fresh or resumed: the adapters' initialisation draws from the stage's seed
        seed_everything(cfg.seed + 1000 * index)
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
        embed_rms = model.word_embedding_rms()  # before sharding: the scale visual tokens are compared with
        loud_warned = False
        sharded = getattr(self.strategy, "shards_parameters", False)
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
        log.info(
            "stage '%s': %d optimizer steps of %d x %d samples (%d train samples)",
            stage.name,
            total,
            stage.batch_size,
            stage.grad_accum,
            data.num_samples,
        )
        autocast = autocast_context(cfg.precision)
        window_start, window_tokens = time.perf_counter(), 0

        def next_batch() -> dict[str, Any]:
            batch, progress.epoch, progress.batch_pos = data.next_batch(progress.epoch, progress.batch_pos)
            return batch

        def one_step() -> dict[str, float]:
            nonlocal window_tokens, loud_warned
            model.train()
            model.visual_rms = None  # set by the step's forward passes when they saw images
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
            progress.stage_step += 1
            progress.global_step += 1
            loss = self.strategy.mean(step.loss)
            window_tokens += step.tokens
            elapsed = time.perf_counter() - window_start
            lr = optimizer.param_groups[0]["lr"]
            record = {
                "step": progress.global_step,
                "stage": stage.name,
                "stage_step": progress.stage_step,
                "epoch": progress.epoch,
                "loss": loss,
                "lr": lr,
                "grad_norm": float(step.grad_norm),
                "tokens": step.tokens,
                "samples": step.samples,
                "tokens_per_s": window_tokens / max(elapsed, 1e-9),
            }
            if model.visual_rms is not None:  # the step's visual tokens against the word embeddings
                record["visual_rms_ratio"] = float(model.visual_rms) / max(embed_rms, 1e-12)
                if record["visual_rms_ratio"] > LOUD_VISUAL_TOKENS and not loud_warned:
                    loud_warned = True
                    log.warning(
                        "stage '%s': visual tokens are %.0fx as large (RMS) as the LLM's word embeddings; "
                        "a pre-norm LLM carries such tokens through its layers almost unchanged "
                        "(see val_visual_cos in metrics.jsonl). bridge.out_norm or a word bridge "
                        "(vocab_mixture, object_slots) keeps them at the word scale",
                        stage.name,
                        record["visual_rms_ratio"],
                    )
            if self.metrics and (progress.stage_step % cfg.log_every == 0 or progress.stage_step == total):
                self.metrics.write(record)
            return {"loss": loss, "lr": lr, "tps": record["tokens_per_s"]}

        def validate(done: int, numbers: dict[str, float]) -> None:
            if cfg.eval_every and done % cfg.eval_every == 0 and done < total:
                self._validate(wrapped, data, stage, progress, autocast, speedup)
                heap.restart()  # what validation and generation left in the heap

        def checkpoint(done: int) -> None:
            self._checkpoint(model, optimizer, scheduler, index, progress)
            heap.restart()

        release_free_memory()  # what loading and data preparation left in the C heap
        heap = HeapReleaser()  # later: only when the heap grew past the steps' working set
        run_loop(
            stage.name,
            total,
            progress.stage_step,
            one_step,
            fields=(
                "loss {task.fields[loss]:.4f}",
                "lr {task.fields[lr]:.2e}",
                "{task.fields[tps]:.0f} tok/s",
            ),
            enabled=self.strategy.is_main,
            after_step=validate,
            checkpoint=checkpoint,
            save_every=cfg.save_every,
        )
        data.close()  # the data-loader workers
        heap.restart()  # the steps' heap back to the OS before the final validation's generation
        self._validate(wrapped, data, stage, progress, autocast, speedup)
        kill_point("stage_validated")
        # released before merging and saving (the step closures refer to these names; the scheduler holds the
        # optimizer too)
        wrapped = optimizer = scheduler = None
        release_free_memory()  # the steps' heap, before the frozen weights' originals come back
        model = self.strategy.unwrap(model)  # FSDP: a plain model holding the gathered full weights
        speedup.undo()  # frozen weights back to their own values and dtype, plain layers
        merge_lora(model)
        for p in model.parameters():
            p.requires_grad_(False)
        if self.strategy.is_main:
            where = stage_dir(self.out, index, stage)
            atomic_write_json(where / STAGE_DONE, {"stage": stage.name, "global_step": progress.global_step})
            model.save_pretrained(where / "model")  # the commit: the stage counts as done from here on
            kill_point("stage_saved")
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
        self._visual_stats(model, batches[0], stage, progress, autocast)
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

    def _visual_stats(
        self, model: Any, batch: dict[str, Any], stage: StageConfig, progress: Progress, autocast: Any
    ) -> None:
        """How the LLM reads the visual tokens of one validation batch (rank 0; not under FSDP, whose root
        parameters are gathered only inside `forward`): their RMS against the word embeddings' and, per
        layer, the cosine of their hidden state with their input (`VisionLanguageModel.visual_token_stats`)."""
        inner = getattr(model, "module", model if self.strategy.world == 1 else None)  # DDP or single
        if inner is None or not self.strategy.is_main:
            return
        inner.eval()
        with autocast:
            stats = inner.visual_token_stats(**batch)
        model.train()
        if not stats or not stats["visual_cos"]:
            return
        vis, txt = stats["visual_cos"], stats["text_cos"]
        picks = sorted({0, len(vis) // 2, len(vis) - 1})
        log.info(
            "stage '%s' step %d: visual tokens at %.2fx the word-embedding RMS; cosine with their input after "
            "layers %s: %s (text tokens: %s)",
            stage.name, progress.stage_step, stats["visual_rms_ratio"],
            "/".join(str(i + 1) for i in picks), " / ".join(f"{vis[i]:.2f}" for i in picks),
            " / ".join(f"{txt[i]:.2f}" for i in picks),
        )  # fmt: skip
        if self.metrics:
            self.metrics.write(
                {
                    "step": progress.global_step,
                    "stage": stage.name,
                    "val_visual_rms_ratio": stats["visual_rms_ratio"],
                    "val_visual_cos": vis,
                    "val_text_cos": txt,
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
        if self.ckpt_root.is_dir():
            shutil.rmtree(self.ckpt_root)


LOUD_VISUAL_TOKENS = 10.0  # visual-token RMS over the word-embedding RMS above which a stage warns once


def _use_pretrained_detector(recipe: RecipeConfig, out: Path, model: VisionLanguageModel | None) -> None:
    """After tower pretraining: a word bridge whose detection head has no `detector.path` takes the head the
    pretraining saved in `out` (and an already built model loads it)."""
    bridge = recipe.model.bridge
    if not uses_detector(bridge) or bridge.detector.path or not (out / HEAD_WEIGHTS).is_file():
        return
    bridge.detector.path = str(out)
    if model is not None:
        for module in model.bridge.modules():
            if isinstance(module, DetectionHead):
                module.load(out)


def _pretrain_config(recipe: RecipeConfig) -> Any:
    """The recipe's `pretrain_vision` section as its objective's validated config (`objective`, default
    `vision_pretrain`: a PretrainVisionConfig) on the recipe's tower."""
    if recipe.pretrain_vision is None:
        return None

    section = dict(recipe.pretrain_vision)
    kind = ObjectiveConfig.kind_class(str(section.get("objective", ObjectiveConfig.objective)))
    fields = {f.name for f in dataclasses.fields(kind)}
    if "vision" in fields and recipe.model.vision.kind != "vit":
        raise ValueError(
            f"pretrain_vision trains the project's `vit` tower, not '{recipe.model.vision.kind}'"
        )
    detector = getattr(recipe.model.bridge, "detector", None)  # word bridges' detection head
    if (
        "label_groups" in fields
        and detector is not None
        and detector.groups
        and "label_groups" not in section
    ):  # the head the bridge expects is the one trained
        section["label_groups"] = {k: list(v) for k, v in detector.groups.items()}
    cfg = from_dict(ObjectiveConfig, section, "pretrain_vision")
    if "vision" in fields:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(recipe.model.vision, path=None))
    return cfg


def _same_config(saved: Path, cfg: Any) -> bool:
    """Whether the config file `saved` (an earlier run's, perhaps with fewer keys) describes `cfg`."""
    try:
        return from_dict(type(cfg), load_yaml(saved)) == cfg
    except (ValueError, TypeError, KeyError):
        return False


def _remove_leftovers(run_dir: Path) -> None:
    """What kills left behind in the run directory and its stage directories: half-written models and files
    (`.model.tmp-PID`, `.done.json.tmp-PID`) and models swapped out by a save (`.model.old-PID`)."""
    for parent in [run_dir, *(run_dir / "stages").glob("*")]:
        for stale in [*parent.glob(".*.tmp-*"), *parent.glob(".*.old-*")]:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _enable_gradient_checkpointing(model: VisionLanguageModel) -> None:
    """Activation checkpointing of the LLM's decoder layers and of the vision tower's blocks."""
    inner = model.llm.model
    if hasattr(inner, "gradient_checkpointing_enable") or hasattr(inner, "activation_checkpointing_enable"):
        enable_activation_checkpointing(inner)
        if hasattr(inner, "enable_input_require_grads"):
            inner.enable_input_require_grads()
    model.vision.enable_gradient_checkpointing()


def train(recipe: RecipeConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Library entry point of `vlmkit train`."""
    return Trainer(recipe, out_dir, resume=resume).run()
