"""Apply a training stage: freeze map, LoRA, parameter groups, and the frozen/trainable table."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmkit.config import LoRAConfig, RecipeConfig, StageConfig
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


class QuantizationUnavailableError(RuntimeError):
    """A stage asks for a quantized LLM (`lora.quantize`) that this machine cannot run."""


def quantization_problem(mode: str) -> str | None:
    """What this machine lacks to train with `lora.quantize: mode` (None: nothing, or `mode` is none)."""
    if mode == "none":
        return None
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install 'vlmkit[qlora]')")
    if not torch.cuda.is_available():
        build = "a CPU build of torch" if torch.version.cuda is None else f"torch {torch.__version__}"
        missing.append(f"a CUDA GPU ({build} sees none; QLoRA's 4-bit NF4 layers are trained on CUDA)")
    return f"lora.quantize: {mode} (QLoRA) needs " + " and ".join(missing) if missing else None


def check_requirements(recipe: RecipeConfig) -> None:
    """Refuse, before any work, a recipe this machine or setup cannot train (QLoRA without CUDA/bitsandbytes,
    QLoRA under FSDP, settings `RecipeConfig.validate` refuses)."""
    recipe.validate()
    for i, stage in enumerate(recipe.stages):
        if stage.lora is None or stage.lora.quantize == "none":
            continue
        problem = quantization_problem(stage.lora.quantize)
        if problem is None and recipe.train.strategy == "fsdp":
            problem = "lora.quantize: 4bit cannot be sharded by train.strategy: fsdp (use single or ddp)"
        if problem is not None:
            raise QuantizationUnavailableError(
                f"stage {i} '{stage.name}': {problem}; or train LoRA on the unquantized LLM "
                f"(--set stages.{i}.lora.quantize=none)"
            )


def quantize_llm_4bit(model: nn.Module, device: torch.device | str) -> int:
    """Replace every `nn.Linear` of the LLM but its output head by a bitsandbytes 4-bit NF4 layer on `device`
    (double quantization, bf16 compute: QLoRA's settings); returns how many were replaced.

    The LLM is then marked `is_loaded_in_4bit`, as transformers marks a model it loads in 4-bit, so that peft
    wraps these layers with its 4-bit LoRA layers.
    """
    import bitsandbytes as bnb

    llm = model.llm.model
    head = llm.get_output_embeddings()
    names = [n for n, m in llm.named_modules() if type(m) is nn.Linear and m is not head]
    for name in names:
        linear = llm.get_submodule(name)
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.bfloat16,
            compress_statistics=True,  # double quantization: the absmax constants are quantized too
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        llm.set_submodule(name, layer.to(device))  # moving the weight to the device quantizes it
    llm.is_loaded_in_4bit = True
    return len(names)


def apply_lora(model: nn.Module, cfg: LoRAConfig, device: torch.device | str | None = None) -> None:
    """Wrap the LLM with peft LoRA adapters (only the adapters train inside the LLM).

    `quantize: 4bit` (QLoRA) first puts the frozen LLM's linear layers in 4-bit NF4 on `device` (default: the
    current CUDA device; refused with `QuantizationUnavailableError` where that cannot run).
    """
    from peft import LoraConfig, get_peft_model

    if cfg.quantize == "4bit":
        if device is None:
            problem = quantization_problem(cfg.quantize)
            if problem is not None:
                raise QuantizationUnavailableError(problem)
            device = torch.device("cuda", torch.cuda.current_device())
        count = quantize_llm_4bit(model, device)
        log.info("QLoRA: %d linear layers of the LLM in 4-bit NF4 (double quantization, bf16 compute)", count)
    peft_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    model.llm.model = get_peft_model(model.llm.model, peft_cfg)


def merge_lora(model: nn.Module) -> None:
    """Fold LoRA adapters into the LLM weights (a plain transformers model again).

    A 4-bit (QLoRA) LLM is dequantized to its original dtype and each adapter's update is added in full precision
    (re-quantizing the merged weight, as peft's own merge of 4-bit layers does, would round most of it away):
    the result holds exactly the weights the adapters were trained against, plus the adapters.
    """
    llm_model = model.llm.model
    if not hasattr(llm_model, "merge_and_unload"):
        return
    if getattr(llm_model.get_base_model(), "is_loaded_in_4bit", False):
        model.llm.model = _merge_dequantized(llm_model)
    else:
        model.llm.model = llm_model.merge_and_unload()


def _merge_dequantized(peft_model: Any) -> nn.Module:
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    dtype = base.get_output_embeddings().weight.dtype  # the LLM's own dtype (its head is never quantized)

    def plain(layer: Any, delta: torch.Tensor | None) -> nn.Linear:
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            layer.state_dict()  # bitsandbytes' CPU inference layout back to the standard one (saving does that)
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        if delta is not None:
            weight = weight + delta.float()
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear = linear.to(device=weight.device, dtype=dtype)
        linear.weight.data.copy_(weight)
        if layer.bias is not None:
            linear.bias.data.copy_(layer.bias.data)
        return linear.requires_grad_(False)

    for name, module in [(n, m) for n, m in base.named_modules() if isinstance(m, LoraLayer)]:
        delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
        base.set_submodule(name, plain(module.get_base_layer(), delta if torch.is_tensor(delta) else None))
    for name, module in [(n, m) for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]:
        base.set_submodule(name, plain(module, None))  # 4-bit layers without an adapter
    base.is_loaded_in_4bit = False
    return base


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
