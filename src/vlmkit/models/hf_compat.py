"""Names transformers changed within 5.x, used under the name the installed version has (the old names warn and
are to go: `past_key_values` in 5.40, `gradient_checkpointing_enable` in v6). `pyproject.toml` allows any 5.x."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn


def cache_kwarg(model: nn.Module) -> str:
    """The keyword under which `model.forward` takes a KV cache: `cache`, or `past_key_values` before the rename."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The KV cache a transformers forward returned (`cache` since the rename, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing of a transformers model, non-reentrant."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
