"""Apply a training stage: freeze map, LoRA, parameter groups, and the frozen/trainable table."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from vlmkit.config import LoRAConfig, StageConfig
from vlmkit.log import get_logger

log = get_logger(__name__)

PRESETS = ("align", "instruct", "full", "custom")


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def preset_trainable(stage: StageConfig, model: nn.Module) -> list[str]:
    """Module prefixes the stage's preset trains (before `trainable` / `frozen` refine it)."""
    if stage.preset not in PRESETS:
        raise ValueError(
            f"stage '{stage.name}': unknown preset '{stage.preset}'; known: {', '.join(PRESETS)}"
        )
    extra = [  # parts that train wherever the bridge does (a prefix fusion has no parameters)
        part
        for part in ("fusion", "adapters")
        if getattr(model, part, None) is not None and any(True for _ in getattr(model, part).parameters())
    ]
    if stage.preset == "align":
        return ["bridge", *extra] + (["vision"] if stage.train_tower else [])
    if stage.preset == "instruct":
        return ["bridge", *extra, "llm"] + (["vision"] if stage.train_tower else [])
    if stage.preset == "full":
        return ["vision", "bridge", *extra, "llm"]
    return []


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> None:
    """Wrap the LLM with peft LoRA adapters (only the adapters train inside the LLM)."""
    from peft import LoraConfig, get_peft_model

    if cfg.quantize != "none":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"lora.quantize '{cfg.quantize}' (QLoRA) needs a CUDA GPU with bitsandbytes")
    peft_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    model.llm.model = get_peft_model(model.llm.model, peft_cfg)


def merge_lora(model: nn.Module) -> None:
    """Fold LoRA adapters into the LLM weights (a plain transformers model again)."""
    llm_model = model.llm.model
    if hasattr(llm_model, "merge_and_unload"):
        model.llm.model = llm_model.merge_and_unload()


def has_lora(model: nn.Module) -> bool:
    return hasattr(model.llm.model, "merge_and_unload")


def set_trainable(model: nn.Module, stage: StageConfig) -> None:
    """requires_grad from the preset, then `trainable` prefixes added, then `frozen` prefixes removed."""
    train = preset_trainable(stage, model) + list(stage.trainable)
    lora = has_lora(model)
    names = [n for n, _ in model.named_parameters()]
    for prefix in [*stage.trainable, *stage.frozen]:
        if not any(_matches(n, prefix) for n in names):
            raise ValueError(
                f"stage '{stage.name}': no parameters under '{prefix}'; top-level parts: "
                f"{', '.join(sorted({n.split('.')[0] for n in names}))}"
            )
    for name, param in model.named_parameters():
        on = any(_matches(name, p) for p in train) and not any(_matches(name, p) for p in stage.frozen)
        if lora and _matches(name, "llm"):
            on = on and "lora_" in name  # under LoRA only the adapters of the LLM train
        param.requires_grad_(on)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() or "gate" in name


def param_groups(model: nn.Module, stage: StageConfig) -> list[dict[str, Any]]:
    """AdamW groups: per-module learning rate (longest matching prefix), no weight decay on norms/biases/gates."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    prefixes = sorted(stage.module_lr, key=len, reverse=True)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = next((stage.module_lr[p] for p in prefixes if _matches(name, p)), stage.lr)
        wd = 0.0 if _no_decay(name, param) else stage.weight_decay
        groups.setdefault((lr, wd), []).append(param)
    if not groups:
        raise ValueError(f"stage '{stage.name}' trains no parameters")
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


@dataclass
class StagePlan:
    stage: StageConfig
    groups: list[dict[str, Any]]


def apply_stage(model: nn.Module, stage: StageConfig) -> StagePlan:
    """Apply LoRA (if any) and the freeze map; return the optimizer parameter groups."""
    if stage.lora is not None and not has_lora(model):
        apply_lora(model, stage.lora)
    set_trainable(model, stage)
    return StagePlan(stage, param_groups(model, stage))


def trainable_names(model: nn.Module) -> Iterable[str]:
    return (n for n, p in model.named_parameters() if p.requires_grad)
