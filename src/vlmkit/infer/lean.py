"""A lean forward pass of a Llama-family LLM for the server's continuous batching (`models/row_batch.py`): the same
math as transformers' forward over the same weights and the same `SlotCache` buffers, with far fewer ops and less
Python per layer.

Per step, transformers' decoder spends more time in small ops and Python than in the attention kernel (docs/
serving.md, "Where the time goes"): a decorated call chain per layer, a `Cache` object per layer, RoPE as ~16 ops
per layer (rotate_half for q and for k), RMSNorm as 8 ops, and the projections' Python. Here, per layer:

* RMSNorm: `torch.rms_norm` without weight (one op computing in fp32, bit-identical to transformers' pow/mean/
  rsqrt/mul chain: tested), then scaled by the weight in the input's dtype, as transformers does;
* q/k/v (and gate/up) from one packed oneDNN linear when `fuse_projections` made them one group (else each module);
* RoPE on q and k together: x*cos + roll(x, d/2)*sin', with sin' = sin whose first half is negated, so
  roll(x)*sin' equals rotate_half(x)*sin element by element; cos/sin computed once per step (the model's own
  rotary module, so any rope scaling it implements is kept);
* the new keys/values written in place into the `SlotCache` buffers (one `index_copy_` each), SDPA over views of
  them with the mask `RowBatch` built (made additive once per call, as SDPA would in every layer), the query packed
  per KV head for one-token steps as transformers does;
* for one-token steps, with `kernels` (infer/kernels.py, the server's default where they build): per layer the
  q/k/v linear, one kernel for RoPE + the cache writes + attention (each row attends to its first position + 1
  keys: the mask `RowBatch.decode` builds), the output linear, one kernel for the residual add + the next RMSNorm,
  the gate/up linear, one kernel for SiLU * up, the down linear — 8 calls instead of ~25; not bit-identical (fp32
  attention probabilities, sums in another order; tests/test_kernels.py). Where a layer does not fit (another
  activation, mixed dtypes), the step runs op by op with the attention kernel alone.

It applies on CPU (where its bit-identity is tested) when every decoder layer is a known Llama-family layer
(`FAMILIES`: the decoder's forward is embed -> layers -> norm, each layer pre-norm attention + gated MLP, no extra
norms) with plain, packed or fused linear projections (no LoRA), SDPA attention, and a plain LM head; xattn layers
(`XAttnDecoderLayer`) keep their cross-attention, called first as in their own forward. Anything else (another
architecture, LoRA, eager attention, another device, autocast, a fusion keyword the layers do not know, another
cache) goes through the model's own forward: `LeanLLM.build` returns None with the reason logged, and a call it
cannot take is handed to the fallback.

Several whole prompts can go in one call (`RowBatch.prefill_many`): right-padded, each row's logits taken at its
own last position (`plan.last`).

Over 400 lines: one forward in its forms (op by op as transformers, prompt chunks and decode steps with the CPU
kernels) over one table of layers, and the structure checks (`unsupported`) that admit a model to it; apart, each
would repeat the walk over the layers and what it assumes of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vlmkit.infer import kernels as cpu_kernels
from vlmkit.infer.prepack import FusedProjection, PackedLinear
from vlmkit.log import get_logger
from vlmkit.models.fusion.xattn import MEDIA_KWARG, XAttnDecoderLayer
from vlmkit.models.row_batch import SlotCache

logger = get_logger(__name__)

# transformers model families whose decoder forward is embed -> rotary -> layers -> final norm, with pre-norm
# decoder layers (input_layernorm -> self_attn -> residual; post_attention_layernorm -> gated MLP -> residual):
# model class -> (decoder layer, attention, MLP, RMSNorm) class names
FAMILIES = {
    "LlamaModel": ("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm"),
    "MistralModel": ("MistralDecoderLayer", "MistralAttention", "MistralMLP", "MistralRMSNorm"),
    "Qwen2Model": ("Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm"),
}

Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LeanOutput:
    logits: torch.Tensor  # [B, 1, V]: the last position only (as `logits_to_keep=1`)


def _linear(module: nn.Module) -> Linear | None:
    """A plain callable for one projection module (None: not a plain linear)."""
    if isinstance(module, PackedLinear):
        return module.matmul
    if type(module) is nn.Linear:
        return module.forward
    return None


def _group(modules: list[nn.Module]) -> tuple[Linear, list[int]] | None:
    """One callable giving the concatenated outputs of `modules` [..., sum(out)] and their sizes (None: one of them
    is not a plain linear)."""
    sizes = [int(m.out_features) for m in modules]
    group = getattr(modules[0], "group", None)
    if (
        all(isinstance(m, FusedProjection) for m in modules)
        and all(m.group is group for m in modules)
        and [m.index for m in modules] == list(range(len(modules)))
        and group.sizes == sizes
    ):
        return group.matmul, sizes
    parts = [_linear(m) for m in modules]
    if any(p is None for p in parts):
        return None
    return lambda x: torch.cat([p(x) for p in parts], dim=-1), sizes  # type: ignore[misc]


@dataclass
class _Layer:
    """What one decoder layer's lean forward needs."""

    norm1: torch.Tensor
    eps1: float
    qkv: Linear
    o_proj: Linear
    norm2: torch.Tensor
    eps2: float
    gate_up: Linear
    down: Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    intermediate: int
    xattn: XAttnDecoderLayer | None = None


class LeanLLM:
    """The lean forward (module docstring) for `RowBatch`: called as its step function,
    (embeds [B, t, D], mask [B, 1, t, L] bool, position_ids [B, t], cache, fusion kwargs) -> `.logits` [B, 1, V]
    of the last position, or of each row's `cache.plan.last` position where set (several prompts in one call)."""

    selects_rows = True  # honours `plan.last` (RowBatch.prefill_many)

    def __init__(
        self, model: Any, fallback: Callable[..., Any], kernels: cpu_kernels.Kernels | None = None
    ) -> None:
        """Use `build`, which checks that `model` (a VisionLanguageModel) has the structure this assumes."""
        llm = model.llm
        self.fallback = fallback
        self.kernels = kernels
        self.decoder = llm.decoder
        config = self.decoder.config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.rotary = self.decoder.rotary_emb
        self.final_norm = self.decoder.norm.weight
        self.final_eps = float(self.decoder.norm.variance_epsilon)
        head = _linear(llm.lm_head)
        assert head is not None
        self.lm_head = head
        self.layers = [self._layer(layer) for layer in self.decoder.layers[: config.num_hidden_layers]]
        self.scaling = float(_inner(self.decoder.layers[0]).self_attn.scaling)
        dtype = self.final_norm.dtype
        self.fused = kernels is not None and all(
            layer.act is F.silu and layer.norm1.dtype == dtype and layer.norm2.dtype == dtype
            for layer in self.layers
        )

    @staticmethod
    def _layer(layer: nn.Module) -> _Layer:
        inner = _inner(layer)
        attn, mlp = inner.self_attn, inner.mlp
        qkv = _group([attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up = _group([mlp.gate_proj, mlp.up_proj])
        o_proj, down = _linear(attn.o_proj), _linear(mlp.down_proj)
        assert qkv is not None and gate_up is not None and o_proj is not None and down is not None
        # torch's SiLU module or transformers' (whose forward is F.silu)
        silu = type(mlp.act_fn) is nn.SiLU or type(mlp.act_fn).__name__ == "SiLUActivation"
        act = F.silu if silu else mlp.act_fn
        return _Layer(
            norm1=inner.input_layernorm.weight,
            eps1=float(inner.input_layernorm.variance_epsilon),
            qkv=qkv[0],
            o_proj=o_proj,
            norm2=inner.post_attention_layernorm.weight,
            eps2=float(inner.post_attention_layernorm.variance_epsilon),
            gate_up=gate_up[0],
            down=down,
            act=act,
            intermediate=gate_up[1][0],
            xattn=layer if isinstance(layer, XAttnDecoderLayer) else None,
        )

    @classmethod
    def build(
        cls, model: Any, fallback: Callable[..., Any] | None = None, kernels: bool = False
    ) -> LeanLLM | None:
        """The lean forward of `model`'s LLM, or None (the reason logged) where it does not apply; `kernels`: run
        decode steps through infer/kernels.py where they build and fit the model."""
        reason = unsupported(model)
        if reason is not None:
            logger.info("lean decode off: %s; the model's own forward is used", reason)
            return None
        config = model.llm.decoder.config
        heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
        dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        dtype = next(model.llm.parameters()).dtype
        fast = None
        if kernels and cpu_kernels.supports(dim, heads // kv_heads, dtype):
            fast = cpu_kernels.load()
        lean = cls(model, fallback or model._step, fast)
        logger.info(
            "lean decode on: %s (decode steps: %s)",
            type(model.llm.decoder).__name__,
            "PyTorch ops"
            if fast is None
            else "vlmkit kernels"
            if lean.fused
            else "PyTorch ops + attention kernel",
        )
        return lean

    # ------------------------------------------------------------------------------------ forward
    def __call__(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        kwargs: dict[str, Any],
    ) -> Any:
        media = kwargs.get(MEDIA_KWARG)
        if (
            not isinstance(cache, SlotCache)
            or any(k != MEDIA_KWARG for k in kwargs)
            or mask.dtype != torch.bool
            or torch.is_autocast_enabled(embeds.device.type)
        ):
            return self.fallback(embeds, mask, position_ids, cache, kwargs)
        plan = cache.plan
        b, t, _ = embeds.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        rep = heads // kv_heads
        half = dim // 2
        cos, sin = self.rotary(embeds, position_ids)  # [B, t, dim] each, in the embeddings' dtype
        if t == 1 and self.fused and cache.plan.slots.start == 0:  # a decode step: rows in slots 0..B-1
            return self._decode_fused(embeds, cos[:, 0], sin[:, 0], cache, media)
        ops = self.kernels if self.fused else None  # prompt chunks: the elementwise kernels only
        rope_cos, rope_sin = cos, sin
        cos = cos[:, :, None]  # [B, t, 1, dim]: broadcast over the heads
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, :, None]
        # SDPA turns a boolean mask into an additive one at every call: once here (the same values: 0 / -inf)
        zero = torch.zeros((), dtype=embeds.dtype, device=embeds.device)
        mask = torch.where(
            mask, zero, torch.full((), float("-inf"), dtype=embeds.dtype, device=embeds.device)
        )
        decode = t == 1
        kernel = self.kernels.decode_attention if decode and self.kernels is not None else None
        valid = plan.starts + 1 if kernel is not None else None  # keys per row: up to its new position
        if (
            decode and plan.flat is None
        ):  # where each (row, kv head) writes in a [slots * H * capacity, dim] view
            capacity = cache.capacity
            head = torch.arange(kv_heads, device=embeds.device)
            plan.flat = ((plan.rows[:, None] * kv_heads + head) * capacity + plan.starts[:, None]).reshape(-1)
        hidden = embeds
        x: torch.Tensor | None = None
        for index, layer in enumerate(self.layers):
            if layer.xattn is not None and media is not None:
                hidden = layer.xattn.cross_attend(hidden, media)
                x = None
            if x is None:
                x = _rms_norm(hidden, layer.norm1, layer.eps1)
            qkv = layer.qkv(x).view(b, t, heads + 2 * kv_heads, dim)
            if ops is not None:
                qk = ops.rope(qkv, rope_cos, rope_sin, heads + kv_heads)
            else:
                qk = qkv[:, :, : heads + kv_heads]
                qk = qk * cos + qk.roll(half, dims=-1) * sin  # [B, t, H + KV, dim]: RoPE on q and k
            keys, values = _buffers(cache.layers[index], qk, kv_heads, dim)
            new_k, new_v = qk[:, :, heads:], qkv[:, :, heads + kv_heads :]  # [B, t, KV, dim]
            if decode:
                keys.view(-1, dim).index_copy_(0, plan.flat, new_k.reshape(b * kv_heads, dim))
                values.view(-1, dim).index_copy_(0, plan.flat, new_v.reshape(b * kv_heads, dim))
            else:  # a prompt chunk of one row, or whole prompts of several rows from position 0
                start = int(plan.starts[0])
                keys[plan.slots, :, start : start + t] = new_k.transpose(1, 2)
                values[plan.slots, :, start : start + t] = new_v.transpose(1, 2)
            k = keys[plan.slots, :, : plan.length]  # [B, KV, L, dim]
            v = values[plan.slots, :, : plan.length]
            if (
                decode
            ):  # one query per row: the heads sharing a KV head as its queries (transformers' pack_gqa)
                q = qk[:, 0, :heads].view(b, kv_heads, rep, dim)
                if kernel is not None:
                    out = kernel(q, k, v, valid, self.scaling)
                else:
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
                out = out.reshape(b, 1, heads * dim)
            else:
                q = qk[:, :, :heads].transpose(1, 2)  # [B, H, t, dim]
                if rep > 1:
                    k = k[:, :, None].expand(-1, -1, rep, -1, -1).reshape(b, heads, -1, dim)
                    v = v[:, :, None].expand(-1, -1, rep, -1, -1).reshape(b, heads, -1, dim)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
                out = out.transpose(1, 2).reshape(b, t, heads * dim)
            if ops is not None:  # residual + norm, SiLU * up, residual + the next norm: one kernel each
                hidden, x = self._mlp_fused(ops, layer, hidden, layer.o_proj(out), index, media)
                continue
            hidden = hidden + layer.o_proj(out)
            x = _rms_norm(hidden, layer.norm2, layer.eps2)
            gate_up = layer.gate_up(x)
            n = layer.intermediate
            hidden = hidden + layer.down(layer.act(gate_up[..., :n]) * gate_up[..., n:])
            x = None
        if ops is not None:  # x: the final norm of every position
            last = (
                x[torch.arange(b, device=x.device), plan.last][:, None]
                if plan.last is not None
                else x[:, -1:]
            )
            return LeanOutput(self.lm_head(last))
        if plan.last is not None:  # right-padded prompts: each row's own last position
            hidden = hidden[torch.arange(b, device=hidden.device), plan.last][:, None]
        last = _rms_norm(hidden[:, -1:], self.final_norm, self.final_eps)
        return LeanOutput(self.lm_head(last))

    def _decode_fused(
        self, embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Any, media: Any
    ) -> LeanOutput:
        """One decode step with the kernels (module docstring): embeds [B, 1, D], cos/sin [B, dim] of each row's
        position (rows in cache slots 0..B-1, each writing at `plan.starts`)."""
        ops = self.kernels
        plan = cache.plan
        hidden = embeds[:, 0]  # [B, D]
        x: torch.Tensor | None = None
        for index, layer in enumerate(self.layers):
            if layer.xattn is not None and media is not None:
                hidden = layer.xattn.cross_attend(hidden[:, None], media)[:, 0]
                x = None
            if x is None:
                x = _rms_norm(hidden, layer.norm1, layer.eps1)
            keys, values = _buffers(cache.layers[index], embeds, self.kv_heads, self.head_dim)
            out = ops.rope_attention(
                layer.qkv(x), cos, sin, keys, values, plan.starts, self.heads, self.kv_heads, self.scaling
            )
            hidden, x = self._mlp_fused(ops, layer, hidden, layer.o_proj(out), index, media)
        return LeanOutput(self.lm_head(x[:, None]))

    def _mlp_fused(
        self, ops: Any, layer: _Layer, hidden: torch.Tensor, attended: torch.Tensor, index: int, media: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rest of layer `index` with the kernels, after its attention output projection `attended`: residual
        + norm, gated MLP, residual + the next layer's input norm (the final norm after the last layer) ->
        (hidden, that norm; None where the next layer cross-attends first)."""
        hidden, x = ops.add_rms_norm(hidden, attended, layer.norm2, layer.eps2)
        delta = layer.down(ops.silu_and_mul(layer.gate_up(x)))
        if index + 1 == len(self.layers):
            return ops.add_rms_norm(hidden, delta, self.final_norm, self.final_eps)
        following = self.layers[index + 1]
        if following.xattn is not None and media is not None:
            return hidden + delta, None  # its cross-attention comes before its norm
        return ops.add_rms_norm(hidden, delta, following.norm1, following.eps1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm: normalised in fp32, rounded to the input's dtype, then scaled by the weight in
    that dtype. `torch.rms_norm` without a weight computes in fp32 and rounds once for fp32 and bf16 inputs
    (bit-identical: tests/test_lean.py); other dtypes are upcast explicitly."""
    if x.dtype in (torch.float32, torch.bfloat16):
        return weight * torch.rms_norm(x, (x.shape[-1],), None, eps)
    return weight * torch.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def _buffers(layer: Any, like: torch.Tensor, kv_heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A `SlotLayer`'s key and value buffers, allocated on first use."""
    if not layer.is_initialized:
        empty = like.new_empty((1, kv_heads, 0, dim))  # only dtype, device, heads and head size matter
        layer.lazy_initialization(empty, empty)
    return layer.keys, layer.values


def _inner(layer: nn.Module) -> nn.Module:
    return layer.layer if isinstance(layer, XAttnDecoderLayer) else layer


def unsupported(model: Any) -> str | None:
    """Why the lean forward does not apply to `model`'s LLM (None: it applies)."""
    llm = model.llm
    hf = llm.model
    device = next(llm.parameters()).device
    if device.type != "cpu":  # the kernels' bit-identity (rms_norm, SDPA's mask) is checked on CPU only
        return f"the LLM is on {device.type} (the lean forward is verified on CPU only)"
    if hasattr(hf, "get_base_model") or getattr(model, "lora_gate", None) is not None:
        return "the LLM has LoRA adapters"
    decoder = getattr(hf, "model", None)
    family = FAMILIES.get(type(decoder).__name__)
    if family is None:
        return f"{type(decoder).__name__} is not a known Llama-family decoder ({', '.join(FAMILIES)})"
    layer_cls, attn_cls, mlp_cls, norm_cls = family
    if llm.attention != "sdpa":
        return f"attention '{llm.attention}' (only sdpa is mirrored)"
    if not llm.plain_lm_head or _linear(llm.lm_head) is None:
        return "the LM head is not a plain linear"
    if type(decoder.norm).__name__ != norm_cls:
        return f"final norm {type(decoder.norm).__name__}"
    config = decoder.config
    if (
        getattr(config, "num_key_value_heads", None) is None
        or config.num_attention_heads % config.num_key_value_heads
    ):
        return "attention heads not a multiple of key/value heads"
    for i, layer in enumerate(decoder.layers):
        inner = _inner(layer)
        if type(layer) is not XAttnDecoderLayer and inner is not layer:
            return f"layer {i} is wrapped ({type(layer).__name__})"
        if isinstance(inner, XAttnDecoderLayer) or type(inner).__name__ != layer_cls:
            return f"layer {i} is {type(inner).__name__}, not {layer_cls}"
        names = {name for name, _ in inner.named_children()}
        if names != {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}:
            return f"layer {i} has other parts: {sorted(names)}"
        attn, mlp = inner.self_attn, inner.mlp
        if type(attn).__name__ != attn_cls or type(mlp).__name__ != mlp_cls:
            return f"layer {i}: {type(attn).__name__} / {type(mlp).__name__}"
        if {name for name, _ in attn.named_children()} != {"q_proj", "k_proj", "v_proj", "o_proj"}:
            return f"layer {i}'s attention has other parts"
        for norm in (inner.input_layernorm, inner.post_attention_layernorm):
            if type(norm).__name__ != norm_cls:
                return f"layer {i}: norm {type(norm).__name__}"
        if (
            _group([attn.q_proj, attn.k_proj, attn.v_proj]) is None
            or _group([mlp.gate_proj, mlp.up_proj]) is None
        ):
            return f"layer {i}'s projections are not plain linears"
        if _linear(attn.o_proj) is None or _linear(mlp.down_proj) is None:
            return f"layer {i}'s output projections are not plain linears"
    return None
