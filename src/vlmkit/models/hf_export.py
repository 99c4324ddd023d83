"""Interop with transformers' `LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration`: export (and
so vLLM) and import.

An export carries everything the model was trained with, or is refused with the reason: the weights (tower
tensors under `vision_tower.vision_model.`, as vLLM's loaders expect, no stale quantization settings), the
image preprocessing (`resize` and `pad` through Llava's image processor, AnyRes with the `llava_next` layout
through LlavaNext's), and the training chat template (with its system prompt) in the processor and tokenizer.

Exportable: prefix fusion, an `hf` tower wrapping CLIP or SigLIP at its native resolution, a `linear` or
depth-2 `mlp` bridge (GELU), no token reduction. A linear bridge is exported as Llava's two-layer projector
with an identity activation and an identity second layer, so the export is exact; importing such a projector
gives a linear bridge again.

Over 400 lines: export and import are two directions of one mapping (weight names, configs, processors);
kept together so that a change to one side is seen next to the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from vlmkit.config import BridgeConfig, FusionConfig, LLMConfig, ModelConfig, ProcessorConfig, VisionConfig
from vlmkit.data.prompts import _adds_bos
from vlmkit.log import get_logger
from vlmkit.models.vlm import VisionLanguageModel, replace_dir
from vlmkit.templates import BUILTIN_TEMPLATES, resolve_template

log = get_logger(__name__)

EXPORTABLE_TOWERS = {"clip_vision_model": "CLIPImageProcessor", "siglip_vision_model": "SiglipImageProcessor"}
# config keys of the LLM that describe how it was loaded, not what it is (a GGUF file's de-quantized weights
# are plain tensors: vLLM refuses a checkpoint that still declares `quant_method: gguf`)
STALE_TEXT_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")
TOWER_PREFIX = "vision_tower."
TOWER_LEVEL = "vision_model."  # the level transformers' CLIP/SigLIP modules had, and vLLM still has


class ExportError(ValueError):
    """The model's combination of parts or settings has no equivalent in transformers' Llava / LlavaNext."""


@dataclass(frozen=True)
class ExportPlan:
    """What an exportable model becomes: its tower's HF model type and the Llava class."""

    tower: str  # clip_vision_model | siglip_vision_model
    next: bool  # LlavaNext (AnyRes, llava_next layout) rather than Llava

    @property
    def architecture(self) -> str:
        return "LlavaNextForConditionalGeneration" if self.next else "LlavaForConditionalGeneration"


def export_plan(model: VisionLanguageModel) -> ExportPlan:
    """The export plan, or raise `ExportError` naming everything that cannot be exported and why."""
    cfg = model.cfg
    problems = []
    if getattr(cfg, "adapters", None) is not None:
        problems.append("LLM adapters (Llava's language model has none)")
    if cfg.fusion.mode != "prefix":
        problems.append(f"fusion '{cfg.fusion.mode}' (Llava only has prefix fusion)")
    hf = model.vision.hf_config_dict() if cfg.vision.kind == "hf" else None
    model_type = (hf or {}).get("model_type")
    if model_type not in EXPORTABLE_TOWERS:
        problems.append(
            f"vision tower '{cfg.vision.kind}'{f' ({model_type})' if model_type else ''} "
            "(Llava export needs an 'hf' tower of CLIP or SigLIP)"
        )
    elif model.vision.image_size != getattr(model.vision, "native_size", model.vision.image_size):
        problems.append(
            f"vision tower run at {model.vision.image_size} px with interpolated positions (native "
            f"{model.vision.native_size} px; Llava runs the tower at its native size)"
        )
    if cfg.bridge.kind not in ("linear", "mlp"):
        problems.append(f"bridge '{cfg.bridge.kind}' (Llava needs linear or a 2-layer mlp)")
    elif cfg.bridge.kind == "mlp" and cfg.bridge.depth != 2:
        problems.append(f"mlp bridge of depth {cfg.bridge.depth} (Llava needs linear or a 2-layer mlp)")
    if cfg.bridge.kind == "mlp" and cfg.bridge.hidden_dim not in (None, model.llm.hidden_size):
        problems.append("mlp bridge with hidden_dim != LLM hidden size")
    if cfg.bridge.reduce != "none":
        problems.append(f"token reduction '{cfg.bridge.reduce}' (Llava has none)")
    if cfg.bridge.out_norm:
        problems.append("bridge.out_norm (Llava's projector has no output norm)")
    if model_type == "clip_vision_model" and not cfg.vision.drop_prefix_tokens:
        problems.append("CLIP tower keeping its CLS token (Llava drops it)")
    problems += _processor_problems(cfg.processor)
    if problems:
        raise ExportError("cannot export to transformers' Llava / LlavaNext: " + "; ".join(problems))
    return ExportPlan(str(model_type), cfg.processor.resize == "anyres")


def _processor_problems(proc: ProcessorConfig) -> list[str]:
    """Preprocessing that transformers' processors cannot reproduce exactly."""
    problems = []
    if proc.resize == "crop":
        problems.append(
            "processor.resize 'crop' (vlmkit resamples the centre square directly; transformers' processors "
            "resize the whole image, then crop: the pixels would differ)"
        )
    if proc.resize == "anyres" and proc.anyres_layout != "llava_next":
        problems.append(
            f"processor.anyres_layout '{proc.anyres_layout}' (LlavaNext unpads the tile grid and adds "
            "image_newline tokens: only the 'llava_next' layout exports)"
        )
    return problems


def check_exportable(model: VisionLanguageModel) -> str:
    """Return the HF vision model_type, or raise `ExportError` saying what cannot be exported and why."""
    return export_plan(model).tower


# ------------------------------------------------------------------------------------------------ weights
def _projector_weights(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    if model.cfg.bridge.kind == "mlp":
        mlp = model.bridge.mlp
        first, second = mlp[0], mlp[2]
        return {
            "linear_1.weight": first.weight,
            "linear_1.bias": first.bias,
            "linear_2.weight": second.weight,
            "linear_2.bias": second.bias,
        }
    proj = model.bridge.proj
    dim = proj.out_features
    return {
        "linear_1.weight": proj.weight,
        "linear_1.bias": proj.bias,
        "linear_2.weight": torch.eye(dim, dtype=proj.weight.dtype),
        "linear_2.bias": torch.zeros(dim),
    }


def text_config(model: VisionLanguageModel) -> dict[str, Any]:
    """The LLM's transformers config without how it was loaded (a GGUF file's quantization settings)."""
    return {k: v for k, v in model.llm.model.config.to_dict().items() if k not in STALE_TEXT_KEYS}


def to_llava(model: VisionLanguageModel) -> LlavaForConditionalGeneration | LlavaNextForConditionalGeneration:
    """Build a transformers Llava (or LlavaNext, for AnyRes) model holding exactly this model's weights.

    An image-gated LoRA (`lora.gate: image`) is merged into the LLM first (in place): Llava has no gate, so the
    export answers text-only prompts with the adapted weights, not the base LLM's as the vlmkit model does."""
    plan = export_plan(model)
    if model.cfg.lora is not None:
        log.warning(
            "export: merging the image-gated LoRA into the LLM weights (Llava has no gate): the exported model "
            "answers text-only prompts differently from the vlmkit model, which runs them without the adapter"
        )
        model.merge_lora()
    text_cfg = text_config(model)
    common = {
        "vision_config": model.vision.hf_config_dict(),
        "text_config": text_cfg,
        "image_token_index": model.image_token_id,
        "image_seq_length": model.tokens_per_image(),
        "projector_hidden_act": "gelu" if model.cfg.bridge.kind == "mlp" else "linear",
        "vision_feature_select_strategy": "default" if plan.tower == "clip_vision_model" else "full",
        "vision_feature_layer": model.cfg.vision.select_layer,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(text_cfg.get("tie_word_embeddings", False)),
    }
    if plan.next:
        pinpoints = [[h, w] for w, h in model.processor.images.grid]  # transformers: (height, width)
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        llava = LlavaNextForConditionalGeneration(config)
    else:
        config = LlavaConfig(**common)
        llava = LlavaForConditionalGeneration(config)
    llava = llava.to(model.llm.embeddings.weight.dtype)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.vision.model.state_dict().items():
        state[f"model.vision_tower.{key}"] = value
    for key, value in _projector_weights(model).items():
        state[f"model.multi_modal_projector.{key}"] = value
    if plan.next:
        state["model.image_newline"] = model.bridge.image_newline
    base_prefix = model.llm.model.base_model_prefix
    for key, value in model.llm.model.state_dict().items():
        if key.startswith(base_prefix + "."):
            state["model.language_model." + key[len(base_prefix) + 1 :]] = value
        else:
            state[key] = value  # lm_head
    missing, unexpected = llava.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ExportError(f"weight mapping incomplete: missing={missing[:5]} unexpected={unexpected[:5]}")
    return llava.eval()


def _vllm_tower_names(out: Path) -> None:
    """Rename the saved tower tensors `vision_tower.X` -> `vision_tower.vision_model.X` in every shard (and the
    shard index): the layout vLLM's CLIP/SigLIP loaders need, which transformers also reads."""

    def rename(key: str) -> str:
        if key.startswith(TOWER_PREFIX) and not key.startswith(TOWER_PREFIX + TOWER_LEVEL):
            return TOWER_PREFIX + TOWER_LEVEL + key[len(TOWER_PREFIX) :]
        return key

    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(shard))
        if any(rename(k) != k for k in tensors):
            save_file({rename(k): v for k, v in tensors.items()}, str(shard), metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------------------------------------- processor
def _image_processor(model: VisionLanguageModel, plan: ExportPlan) -> Any:
    """The transformers image processor that reproduces the model's training preprocessing (PIL backend, as
    vlmkit resamples with PIL)."""
    import transformers

    size = model.vision.image_size
    common = {
        "do_resize": True,
        "resample": 3,  # bicubic, as vlmkit
        "do_rescale": True,
        "do_normalize": True,
        "image_mean": list(model.vision.image_mean),
        "image_std": list(model.vision.image_std),
        "do_convert_rgb": True,
    }
    resize = model.cfg.processor.resize
    if plan.next:  # global view squashed to size x size, then the best-fit grid's tiles on a black canvas
        pinpoints = [[h, w] for w, h in model.processor.images.grid]
        cls = _pil_class(transformers, "LlavaNextImageProcessor")
        return cls(
            size={"height": size, "width": size},
            crop_size={"height": size, "width": size},
            do_center_crop=False,
            do_pad=True,
            image_grid_pinpoints=pinpoints,
            **common,
        )
    square = {"size": {"height": size, "width": size}, "do_center_crop": False}
    if resize == "pad":  # expand2square with the mean colour, then resize (vlmkit's `pad`)
        return _pil_class(transformers, "LlavaImageProcessor")(do_pad=True, **square, **common)
    return _pil_class(transformers, EXPORTABLE_TOWERS[plan.tower])(**square, **common)


def _pil_class(transformers: Any, name: str) -> Any:
    """The PIL-backend class of an image processor where transformers has one (pixel-exact with vlmkit)."""
    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


def export_chat_template(model: VisionLanguageModel) -> str:
    """The training chat template as a self-contained jinja template for transformers / vLLM.

    A prologue makes it render exactly as vlmkit does: content given as parts ({type: image} / {type: text})
    becomes text with the image token (plus a newline before text that follows an image directly, LLaVA's
    convention); the processor's system prompt is added when a conversation has none; the built-in templates'
    BOS is written only where the tokenizer adds one itself (vlmkit tokenizes chat text without special tokens,
    as vLLM's chat endpoint does)."""
    proc = model.cfg.processor
    template = resolve_template(model.tokenizer, proc.template)
    image = json.dumps(model.llm.image_token)
    lines = [
        "{%- set image_token = " + image + " -%}",
        "{%- set ns = namespace(messages=[]) -%}",
        "{%- for m in messages -%}",
        "{%- if m['content'] is string -%}{%- set text = m['content'] -%}",
        "{%- else -%}{%- set parts = namespace(text='') -%}",
        "{%- for p in m['content'] -%}",
        "{%- if p['type'] in ['image', 'image_url'] -%}{%- set parts.text = parts.text + image_token -%}",
        "{%- if not loop.last and loop.nextitem['type'] == 'text' and not loop.nextitem['text'][:1].isspace() "
        "-%}{%- set parts.text = parts.text + '\\n' -%}{%- endif -%}",
        "{%- else -%}{%- set parts.text = parts.text + p['text'] -%}{%- endif -%}",
        "{%- endfor -%}{%- set text = parts.text -%}{%- endif -%}",
        "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': text}] -%}",
        "{%- endfor -%}",
    ]
    if proc.system_prompt is not None:
        system = json.dumps(proc.system_prompt)
        lines.append(
            "{%- if not ns.messages or ns.messages[0]['role'] != 'system' -%}"
            "{%- set ns.messages = [{'role': 'system', 'content': " + system + "}] + ns.messages -%}"
            "{%- endif -%}"
        )
    lines.append("{%- set messages = ns.messages -%}")
    if template in BUILTIN_TEMPLATES.values() and not _adds_bos(model.tokenizer):
        lines.append("{%- set bos_token = '' -%}")
    return "".join(lines) + template


def _processor(model: VisionLanguageModel, plan: ExportPlan, chat_template: str) -> Any:
    from transformers import LlavaNextProcessor, LlavaProcessor

    cls = LlavaNextProcessor if plan.next else LlavaProcessor
    return cls(
        image_processor=_image_processor(model, plan),
        tokenizer=model.tokenizer,
        patch_size=model.vision.image_size // model.vision.grid_size(),
        vision_feature_select_strategy="default" if plan.tower == "clip_vision_model" else "full",
        chat_template=chat_template,
        image_token=model.llm.image_token,
        num_additional_image_tokens=1 if plan.tower == "clip_vision_model" else 0,
    )


def export_hf(model: VisionLanguageModel, out_dir: str | Path) -> Path:
    """Write a transformers/vLLM-loadable Llava or LlavaNext checkpoint (weights, config, tokenizer with the
    training chat template, processor), atomically; raises `ExportError` before writing anything when some
    part or setting cannot be carried."""
    plan = export_plan(model)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-export"
    llava = to_llava(model)
    llava.save_pretrained(tmp)
    _vllm_tower_names(tmp)
    chat_template = export_chat_template(model)
    tokenizer = model.tokenizer
    own_template = tokenizer.chat_template
    try:
        tokenizer.chat_template = chat_template  # saved with the tokenizer too (vLLM reads either)
        _processor(model, plan, chat_template).save_pretrained(tmp)
    finally:
        tokenizer.chat_template = own_template
    replace_dir(tmp, out)
    log.info("exported %s to %s", plan.architecture, out)
    return out


# ------------------------------------------------------------------------------------------------ import
def _preprocessor(hf_dir: Path | None) -> dict[str, Any]:
    proc = hf_dir / "preprocessor_config.json" if hf_dir else None
    return json.loads(proc.read_text()) if proc is not None and proc.is_file() else {}


def _with_processor_stats(preprocessor: dict[str, Any], vision_cfg: dict[str, Any]) -> dict[str, Any]:
    """Copy the checkpoint's preprocessor mean/std into the vision config (the tower reads them from there)."""
    if preprocessor.get("image_mean") and preprocessor.get("image_std"):
        vision_cfg = {
            **vision_cfg,
            "image_mean": list(preprocessor["image_mean"]),
            "image_std": list(preprocessor["image_std"]),
        }
    return vision_cfg


def from_llava(
    llava: LlavaForConditionalGeneration | LlavaNextForConditionalGeneration,
    tokenizer: Any,
    hf_dir: Path | None = None,
) -> VisionLanguageModel:
    """Build our model from a transformers Llava or LlavaNext model (same weights, same logits)."""
    config = llava.config
    preprocessor = _preprocessor(hf_dir)
    vision_cfg = _with_processor_stats(preprocessor, config.vision_config.to_dict())
    model_type = vision_cfg.get("model_type")
    if model_type not in EXPORTABLE_TOWERS:
        raise ExportError(
            f"importing Llava with a '{model_type}' vision tower is not supported (CLIP, SigLIP)"
        )
    if not isinstance(config.vision_feature_layer, int):
        raise ExportError("importing Llava with several vision_feature_layer values is not supported")
    act = config.projector_hidden_act
    if act not in ("gelu", "linear"):
        raise ExportError(f"projector activation '{act}' is not supported (gelu, linear)")
    is_next = isinstance(llava, LlavaNextForConditionalGeneration)
    if is_next:  # LlavaNext: AnyRes with LLaVA-NeXT's layout; pinpoints are (height, width) there
        grid = [[int(w), int(h)] for h, w in config.image_grid_pinpoints]
        processor = ProcessorConfig(resize="anyres", anyres_grid=grid, anyres_layout="llava_next")
    else:
        processor = ProcessorConfig(resize="pad" if preprocessor.get("do_pad") else "resize")
    proj = llava.model.multi_modal_projector
    image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
    text_cfg = config.text_config.to_dict()
    # whether lm_head is the embedding matrix is the composite model's setting (LlavaNext defaults to untied)
    text_cfg["tie_word_embeddings"] = bool(getattr(config, "tie_word_embeddings", False))
    cfg = ModelConfig(
        vision=VisionConfig.make(
            "hf",
            hf_config=vision_cfg,
            select_layer=config.vision_feature_layer,
            drop_prefix_tokens=config.vision_feature_select_strategy == "default",
        ),
        bridge=BridgeConfig.make("mlp", depth=2) if act == "gelu" else BridgeConfig.make("linear"),
        llm=LLMConfig.make("hf", hf_config=text_cfg, image_token=image_token),
        fusion=FusionConfig(mode="prefix"),
        processor=processor,
    )
    model = VisionLanguageModel.from_config(cfg, tokenizer=tokenizer)
    model.vision.model.load_state_dict(llava.model.vision_tower.state_dict())
    with torch.no_grad():
        if act == "gelu":
            model.bridge.mlp[0].load_state_dict(proj.linear_1.state_dict())
            model.bridge.mlp[2].load_state_dict(proj.linear_2.state_dict())
        else:  # identity activation: the two layers compose into one linear map exactly
            w2, b2 = proj.linear_2.weight, proj.linear_2.bias
            model.bridge.proj.weight.copy_(w2 @ proj.linear_1.weight)
            model.bridge.proj.bias.copy_(w2 @ proj.linear_1.bias + b2)
        if is_next:
            model.bridge.image_newline.copy_(llava.model.image_newline)
    llm_state = {
        f"{model.llm.model.base_model_prefix}.{k}": v
        for k, v in llava.model.language_model.state_dict().items()
    }
    llm_state["lm_head.weight"] = llava.lm_head.weight
    model.llm.model.load_state_dict(llm_state)
    return model.eval()


def import_hf(hf_dir: str | Path) -> VisionLanguageModel:
    """Load a transformers Llava or LlavaNext checkpoint directory as a vlmkit model."""
    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    arch = config.get("model_type")
    if arch not in ("llava", "llava_next"):
        raise ExportError(f"{hf_dir}: model_type '{arch}' is not importable (llava, llava_next)")
    cls = LlavaNextForConditionalGeneration if arch == "llava_next" else LlavaForConditionalGeneration
    llava = cls.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    return from_llava(llava, tokenizer, hf_dir)
