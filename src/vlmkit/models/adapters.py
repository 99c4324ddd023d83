"""Bottleneck adapters inside a frozen LLM (Lynx): zero-initialised residual MLPs after chosen decoder layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmkit.config import AdapterConfig
from vlmkit.models.llm import DecoderLayerWrapper, LanguageModel

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """x + up(act(down(x))): [B, T, D] -> [B, D_bottleneck] -> [B, T, D].

    `up` starts at exactly zero, so a fresh adapter is the identity and the LLM is unchanged at init; `down`
    keeps its random init, so `up` receives a gradient on the first step.
    """

    def __init__(self, dim: int, bottleneck: int, activation: str = "gelu") -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"adapters.dim must be >= 1, got {bottleneck}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown adapters.activation '{activation}'; known: {', '.join(ACTIVATIONS)}")
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D], computed in the adapter's dtype and returned in x's."""
        h = x.to(self.down.weight.dtype)
        return x + self.up(self.act(self.down(h))).to(x.dtype)


class AdapterDecoderLayer(DecoderLayerWrapper):
    """One LLM decoder layer, then its adapter (owned by `LLMAdapters.blocks`) on the hidden states."""

    owner = "adapter=adapters.blocks"

    @property
    def adapter(self) -> BottleneckAdapter:
        return self._block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Same signature and return value as the wrapped layer (a tensor, or a tuple led by the hidden states)."""
        out = self.layer(*args, **kwargs)
        if isinstance(out, tuple):
            return (self._block(out[0]), *out[1:])
        return self._block(out)


def adapter_layers(num_layers: int, every: int) -> list[int]:
    """Decoder layers that get an adapter: 0, every, 2*every, ... (Lynx's `range(0, L, adapter_freq)`)."""
    if every < 1:
        raise ValueError(f"adapters.every must be >= 1, got {every}")
    return list(range(0, num_layers, every))


class LLMAdapters(nn.Module):
    """Inserts a `BottleneckAdapter` after every `cfg.every`-th decoder layer of `llm` (in place, by wrapping
    the layer instances) and owns them as `blocks["<layer index>"]`."""

    def __init__(self, llm: LanguageModel, cfg: AdapterConfig) -> None:
        super().__init__()
        layers = llm.layers
        if any(isinstance(layer, AdapterDecoderLayer) for layer in layers):
            raise ValueError("the LLM already has adapters")
        chosen = adapter_layers(len(layers), cfg.every)
        dim = llm.hidden_size
        self.blocks = nn.ModuleDict({str(i): BottleneckAdapter(dim, cfg.dim, cfg.activation) for i in chosen})
        for i in chosen:
            layers[i] = AdapterDecoderLayer(layers[i], self.blocks[str(i)], i)
