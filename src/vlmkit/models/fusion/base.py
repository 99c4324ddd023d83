"""The fusion contract: how visual tokens enter the LLM, for a training forward and for every decode step.

A fusion is a registered strategy (`FUSIONS`), built as `cls(llm, cfg)`. It keeps no state between calls: the
images reach it as arguments (`merge`), and what the LLM needs besides the input embeddings travels as keyword
arguments of the LLM call (`LLMInputs.kwargs`), which `advance` carries from one decode step to the next.

Continuous batching (rows that join and leave a running decode batch) needs three more operations on those
keyword arguments, all along the batch dimension or the token axis, none of them about a particular fusion in the
caller: `window` (the arguments of a call over a span of the prompt: chunked prefill), `join` (rows of several
calls decoding together from now on) and `select` (the rows that stay). A fusion whose `merge` returns no keyword
arguments needs none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmkit.registry import Registry

FUSIONS: Registry[type[Fusion]] = Registry("fusion mode")


@dataclass
class LLMInputs:
    """What one LLM call takes: input embeddings [B, T, D] and fusion-specific keyword arguments."""

    embeds: torch.Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)


class Fusion(nn.Module):
    """Base of every fusion mode (see the module docstring)."""

    def __init__(self, llm: Any, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg

    def placeholders(self, visual_tokens: int) -> int:
        """Image placeholder tokens in the text for an image that yields `visual_tokens` tokens."""
        raise NotImplementedError

    def merge(
        self,
        is_image: torch.Tensor,
        embeds: torch.Tensor,
        visual: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
    ) -> LLMInputs:
        """is_image [B, T] (placeholder positions), embeds [B, T, D] (text embeddings), visual [I, M, D] (the
        images' tokens in text order, or None) -> the LLM's inputs. `position_ids` [B, T] mark packed samples
        (a sample starts where its position is 0)."""
        raise NotImplementedError

    def advance(self, kwargs: dict[str, Any], cached: bool) -> dict[str, Any]:
        """The keyword arguments for the next decode step, one new token per row; `cached`: the step feeds only
        the new token (KV cache) rather than the whole sequence."""
        return kwargs

    def window(self, kwargs: dict[str, Any], start: int, end: int) -> dict[str, Any]:
        """The keyword arguments of a call over tokens [start, end) of every row (a chunk of the prompt fed with a
        KV cache holding the tokens before `start`)."""
        return _no_kwargs(self, kwargs, "window")

    def join(self, parts: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
        """One batch from the rows of several calls (`parts[i]` covers `sizes[i]` rows, in order), each row going
        on one new token per call from here (what `advance(kwargs, cached=True)` gave for it)."""
        if any(parts):
            raise NotImplementedError(
                f"{type(self).__name__} passes keyword arguments ({sorted(set().union(*parts))}) to the LLM but "
                "does not implement `join`, which continuous batching needs"
            )
        return {}

    def select(self, kwargs: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
        """The keyword arguments of the rows `rows` [R] (batch indices, in the new order) of a decode batch."""
        return _no_kwargs(self, kwargs, "select")

    def check(self, kwargs: dict[str, Any]) -> None:
        """After an LLM call: raise if the fusion's inputs did not reach the layers that needed them."""


def _no_kwargs(fusion: Fusion, kwargs: dict[str, Any], method: str) -> dict[str, Any]:
    if kwargs:
        raise NotImplementedError(
            f"{type(fusion).__name__} passes keyword arguments ({sorted(kwargs)}) to the LLM but does not implement "
            f"`{method}`, which continuous batching needs"
        )
    return kwargs
