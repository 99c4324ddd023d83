"""Interop with transformers' `LlavaForConditionalGeneration`: export (and so vLLM) and import.

Exportable: prefix fusion, an `hf` tower wrapping CLIP or SigLIP, a `linear` or depth-2 `mlp` bridge (GELU),
no token reduction. A linear bridge is exported as Llava's two-layer projector with an identity activation and
an identity second layer, so the export is exact; importing such a projector gives a linear bridge again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

from vlmkit.config import BridgeConfig, FusionConfig, LLMConfig, ModelConfig, VisionConfig
from vlmkit.log import get_logger
from vlmkit.models.vlm import VisionLanguageModel, replace_dir

log = get_logger(__name__)

EXPORTABLE_TOWERS = {"clip_vision_model": "CLIPImageProcessor", "siglip_vision_model": "SiglipImageProcessor"}


class ExportError(ValueError):
    """The model's combination of parts has no equivalent in transformers' Llava."""


def check_exportable(model: VisionLanguageModel) -> str:
    """Return the HF vision model_type, or raise `ExportError` saying what cannot be exported and why."""
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
    if problems:
        raise ExportError("cannot export to LlavaForConditionalGeneration: " + "; ".join(problems))
    return str(model_type)


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


def to_llava(model: VisionLanguageModel) -> LlavaForConditionalGeneration:
    """Build a transformers Llava model holding exactly this model's weights.

    An image-gated LoRA (`lora.gate: image`) is merged into the LLM first (in place): Llava has no gate, so the
    export answers text-only prompts with the adapted weights, not the base LLM's as the vlmkit model does."""
    model_type = check_exportable(model)
    if model.cfg.lora is not None:
        log.warning(
            "export: merging the image-gated LoRA into the LLM weights (Llava has no gate): the exported model "
            "answers text-only prompts differently from the vlmkit model, which runs them without the adapter"
        )
        model.merge_lora()
    vision_cfg = model.vision.hf_config_dict()
    text_cfg = model.llm.model.config.to_dict()
    config = LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_index=model.image_token_id,
        image_seq_length=model.tokens_per_image(),
        projector_hidden_act="gelu" if model.cfg.bridge.kind == "mlp" else "linear",
        vision_feature_select_strategy="default" if model_type == "clip_vision_model" else "full",
        vision_feature_layer=model.cfg.vision.select_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(text_cfg.get("tie_word_embeddings", False)),
    )
    llava = LlavaForConditionalGeneration(config).to(model.llm.embeddings.weight.dtype)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.vision.model.state_dict().items():
        state[f"model.vision_tower.{key}"] = value
    for key, value in _projector_weights(model).items():
        state[f"model.multi_modal_projector.{key}"] = value
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


def _image_processor(model: VisionLanguageModel, model_type: str) -> Any:
    import transformers

    cls = getattr(transformers, EXPORTABLE_TOWERS[model_type])
    size = model.vision.image_size
    return cls(
        do_resize=True,
        size={"height": size, "width": size},
        resample=3,  # bicubic, as VisionTower.transform
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(model.vision.image_mean),
        image_std=list(model.vision.image_std),
        do_convert_rgb=True,
    )


def export_hf(model: VisionLanguageModel, out_dir: str | Path) -> Path:
    """Write a transformers/vLLM-loadable Llava checkpoint (weights, config, tokenizer, processor), atomically."""
    from transformers import LlavaProcessor

    model_type = check_exportable(model)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-export"
    llava = to_llava(model)
    llava.save_pretrained(tmp)
    tokenizer = model.tokenizer
    processor = LlavaProcessor(
        image_processor=_image_processor(model, model_type),
        tokenizer=tokenizer,
        patch_size=model.vision.image_size // model.vision.grid_size(),
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        chat_template=tokenizer.chat_template,
        image_token=model.llm.image_token,
        num_additional_image_tokens=1 if model_type == "clip_vision_model" else 0,
    )
    processor.save_pretrained(tmp)
    replace_dir(tmp, out)
    log.info("exported %s to %s", type(llava).__name__, out)
    return out


def _with_processor_stats(hf_dir: Path | None, vision_cfg: dict[str, Any]) -> dict[str, Any]:
    """Copy the checkpoint's preprocessor mean/std into the vision config (the tower reads them from there)."""
    proc = hf_dir / "preprocessor_config.json" if hf_dir else None
    if proc is not None and proc.is_file():
        data = json.loads(proc.read_text())
        if data.get("image_mean") and data.get("image_std"):
            vision_cfg = {
                **vision_cfg,
                "image_mean": list(data["image_mean"]),
                "image_std": list(data["image_std"]),
            }
    return vision_cfg


def from_llava(
    llava: LlavaForConditionalGeneration, tokenizer: Any, hf_dir: Path | None = None
) -> VisionLanguageModel:
    """Build our model from a transformers Llava model (same weights, same logits)."""
    config = llava.config
    vision_cfg = _with_processor_stats(hf_dir, config.vision_config.to_dict())
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
    proj = llava.model.multi_modal_projector
    image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
    cfg = ModelConfig(
        vision=VisionConfig.make(
            "hf",
            hf_config=vision_cfg,
            select_layer=config.vision_feature_layer,
            drop_prefix_tokens=config.vision_feature_select_strategy == "default",
        ),
        bridge=BridgeConfig.make("mlp", depth=2) if act == "gelu" else BridgeConfig.make("linear"),
        llm=LLMConfig.make("hf", hf_config=config.text_config.to_dict(), image_token=image_token),
        fusion=FusionConfig(mode="prefix"),
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
    llm_state = {
        f"{model.llm.model.base_model_prefix}.{k}": v
        for k, v in llava.model.language_model.state_dict().items()
    }
    llm_state["lm_head.weight"] = llava.lm_head.weight
    model.llm.model.load_state_dict(llm_state)
    return model.eval()


def import_hf(hf_dir: str | Path) -> VisionLanguageModel:
    """Load a transformers Llava checkpoint directory as a vlmkit model."""
    hf_dir = Path(hf_dir)
    llava = LlavaForConditionalGeneration.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    return from_llava(llava, tokenizer, hf_dir)
