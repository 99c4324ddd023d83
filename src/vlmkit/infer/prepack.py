"""Inference-only CPU speed-up: every `nn.Linear` of a model gets its weight prepacked for oneDNN, the blocked layout
PyTorch's own compiler (inductor, with freezing) gives CPU linears. At decode batch sizes this is about 1.5x (bf16)
to 2.5x (fp32) faster than `F.linear` on the plain weight (bench/generate_throughput.py measures it).

`fuse_projections` goes one step further for decoder layers: the query/key/value projections (and the MLP's gate/up
projections), which all read the same input, become one packed linear over the concatenated weights; each original
projection returns its slice of the shared output. At decode batch sizes this saves a call and a pass over the
input per fused linear (docs/serving.md: measured).

With `kernels` (infer/kernels.py, where its bf16 linear is built and chosen: `kernels.linear_kernels`), bf16
weights are packed for vlmkit's own linear (`csrc/linear.cpp`) instead: at decode batch sizes it reads the weights
~1.5x faster than oneDNN's packed linear on the AVX512-BF16 machine of docs/serving.md, at prompt sizes as fast
(bench/serve_profile.py, `linear` variant); not bit-identical to oneDNN (sums in another order).

Only for a model that is served (no gradients flow through the packed op): the module keeps its original weight
(the same tensor, so `state_dict` and tied embeddings are unchanged) plus the packed copy, which costs one more copy
of the linear weights in memory. Where oneDNN or the op is missing, the linear is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vlmkit.infer import kernels as _kernels
from vlmkit.infer.kernels import Kernels
from vlmkit.log import get_logger

logger = get_logger(__name__)

Matmul = Callable[[torch.Tensor], torch.Tensor]


def _pack(weight: torch.Tensor, kernels: Kernels | None) -> tuple[torch.Tensor, Kernels | None]:
    """The packed copy of `weight` [out, in], and the kernels that run it (None: oneDNN's)."""
    with torch.no_grad():
        if kernels is not None and weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0:
            return kernels.pack_linear(weight.detach()), kernels
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach()), None


def _matmul(packed: torch.Tensor, kernels: Kernels | None, bias: torch.Tensor | None, out: int) -> Matmul:
    """x [..., in] -> x @ weight.T + bias [..., out] by the packed weight."""
    if kernels is not None:
        linear = kernels.linear
        return lambda x: linear(x.to(torch.bfloat16), packed, bias, out)
    dtype = packed.dtype
    return lambda x: torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight prepacked for oneDNN or vlmkit's bf16 linear (forward only)."""

    def __init__(self, linear: nn.Linear, kernels: Kernels | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same parameter: state_dict, ties and saving are unchanged
        self.bias = linear.bias
        packed, self.kernels = _pack(linear.weight, kernels)
        self.register_buffer("packed", packed, persistent=False)
        self.matmul = _matmul(
            packed, self.kernels, None if self.bias is None else self.bias.detach(), self.out_features
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        return self.matmul(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked"


def available() -> bool:
    """True where oneDNN's packed linear can run (PyTorch built with mkldnn, on CPU)."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def prepack_linears(model: nn.Module, kernels: Kernels | None = None) -> int:
    """Replace each CPU `nn.Linear` (fp32 or bf16 weights) in `model` by a `PackedLinear` (bf16 ones for `kernels`'
    linear where given), in place; returns how many were packed (0 where it is not available)."""
    if not available():
        return 0
    packed = 0
    for parent_name, parent in list(model.named_modules()):
        if any(part.startswith("lora_") for part in parent_name.split(".")):
            continue  # peft's LoRA branches stay as they are: rank r (little to gain), and an image gate hooks them
        for name, child in list(parent.named_children()):
            if (
                type(child) is nn.Linear
                and child.weight.device.type == "cpu"
                and child.weight.dtype in (torch.float32, torch.bfloat16)
            ):
                try:
                    setattr(parent, name, PackedLinear(child, kernels))
                except RuntimeError as err:  # an unusual shape or build: keep the plain linear
                    logger.debug("linear %s not prepacked: %s", name, err)
                    continue
                packed += 1
    return packed


class _FusedGroup:
    """One packed linear over several projections' concatenated weights; computed once per input tensor (a part
    called with another tensor than the others, as in cross-attention, computes again: correct, only slower)."""

    def __init__(self, linears: list[nn.Linear], kernels: Kernels | None = None) -> None:
        weight = torch.cat([lin.weight.detach() for lin in linears])  # [sum(out), in]
        self.sizes = [lin.out_features for lin in linears]
        self.packed, self.kernels = _pack(weight, kernels)
        self.matmul = _matmul(self.packed, self.kernels, None, sum(self.sizes))
        # the input whose output is held (a strong reference: its id cannot be reused while held)
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.unread: set[int] = set()

    def slice(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """x [..., in] -> projection `index`'s output [..., out_index] (a view of the shared output)."""
        if self.input is not x or index not in self.unread:  # a new input (or this part read already)
            self.output = self.matmul(x)
            self.input, self.unread = x, set(range(len(self.sizes)))
        start = sum(self.sizes[:index])
        out = self.output[..., start : start + self.sizes[index]]
        self.unread.discard(index)
        if not self.unread:  # every part read: hold nothing until the next input
            self.input = self.output = None
        return out


class FusedProjection(nn.Module):
    """One of the projections of a `_FusedGroup` (forward only); keeps its own weight for `state_dict`."""

    def __init__(self, linear: nn.Linear, group: _FusedGroup, index: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same parameter: state_dict, ties and saving are unchanged
        self.register_parameter("bias", None)
        self.group, self.index = group, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        return self.group.slice(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused part {self.index}"


FUSABLE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_projections(model: nn.Module, kernels: Kernels | None = None) -> int:
    """In every module with the projections of a `FUSABLE` group (transformers' Llama-style attention and MLP: the
    same input, no bias, CPU, fp32 or bf16), make them parts of one packed linear (bf16: for `kernels`' linear
    where given); returns the groups fused."""
    if not available():
        return 0
    fused = 0
    for module in list(model.modules()):
        for names in FUSABLE:
            parts = [getattr(module, name, None) for name in names]
            if not all(isinstance(p, (nn.Linear, PackedLinear)) for p in parts):
                continue
            weights = [p.weight for p in parts]
            if any(p.bias is not None for p in parts) or len({(w.dtype, w.shape[1]) for w in weights}) != 1:
                continue
            if weights[0].device.type != "cpu" or weights[0].dtype not in (torch.float32, torch.bfloat16):
                continue
            try:
                group = _FusedGroup(parts, kernels)  # type: ignore[arg-type]
            except RuntimeError as err:
                logger.debug("projections %s not fused: %s", names, err)
                continue
            for index, (name, part) in enumerate(zip(names, parts)):
                setattr(module, name, FusedProjection(part, group, index))  # type: ignore[arg-type]
            fused += 1
    return fused


def prepack_for_serving(model: nn.Module, fuse: bool = True, cpu_kernels: bool = True) -> None:
    """`fuse_projections` on the LLM (with `fuse`), then `prepack_linears` on the whole model; bf16 linears for
    vlmkit's own linear where it is chosen (`kernels.linear_kernels`, with `cpu_kernels`), else for oneDNN."""
    bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
    ops = _kernels.linear_kernels() if cpu_kernels and bf16 else None
    llm = getattr(model, "llm", model)
    fused = fuse_projections(llm, ops) if fuse else 0  # first: no packed copy of a fused weight is made
    logger.info(
        "prepacked %d linear layers (+%d fused groups) for %s",
        prepack_linears(model, ops),
        fused,
        "oneDNN" if ops is None else "vlmkit's bf16 linear (bf16 weights) and oneDNN",
    )
