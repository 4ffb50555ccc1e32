"""Inference-only weight packing for CPU decoding: the one piece of this package that is about kernels,
not about Gemma 3, kept out of model.py so the model reads as the architecture.

`Gemma3Model.pack_weights()` gives each projection (q/k/v and gate/up fused) and the output head a
`PackedWeight`; the modules call `project(...)`, which uses the packed copy while it still matches the
module's weights and gradients are off, and the plain nn.Linear otherwise (training, LoRA, new weights).
`WeightState` is how a packed copy (and RMSNorm's cached fp32 gain) knows it still matches its weights.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gemma3 import kernels
from gemma3.kernels import NativeLinear


class WeightState:
    """What a copy derived from some weights was derived from: those very tensor objects, in that storage,
    at that in-place version. It stops matching once one of them changes in place (an optimizer step,
    `load_state_dict`) or is replaced by another tensor, even one whose memory reuses the old address."""

    def __init__(self, weights: Sequence[torch.Tensor]):
        self.refs = [weakref.ref(w) for w in weights]
        self.keys = [(w.data_ptr(), w._version) for w in weights]

    def matches(self, weights: Sequence[torch.Tensor]) -> bool:
        return len(weights) == len(self.refs) and all(
            ref() is w and key == (w.data_ptr(), w._version) for ref, key, w in zip(self.refs, self.keys, weights))


class PackedWeight:
    """Inference-only ways to apply one or more (out, in) weights, stacked along `out` (q/k/v, gate/up), in
    whatever form this CPU's kernels read fastest.

    A batch-1 decode step is a chain of matrix-vector products that read every weight once, so its speed
    is how fast the kernels stream weights from memory. Measured on the 270M (AMD EPYC, torch 2.13):
    * one token (decode), bf16 or fp32: the native kernel (gemma3.kernels, built on first use with the
      system C compiler) reads nn.Linear's own weights in place, row by row, with no copy and no
      concatenation: 1.2-2.4× the rate of oneDNN on packed bf16 weights and of MKL's fp32 GEMV. Without
      it (no compiler, not x86-64), the copies below take these calls too.
    * many tokens (prefill), bf16: nn.Linear hands oneDNN a plain weight that it re-packs into its blocked
      bf16 format on every call; a copy packed once up front is bit-identical and skips that.
    * many tokens, fp32: MKL reads a transposed (in, out) copy, used as x @ Wᵀ, faster than nn.Linear's
      layout. Its GEMM and the decode kernels sum in different orders, so on the real 270M a cached decode
      and a full forward of the same sequence differ by more than with the plain weights (see the README's
      exactness section for the figures).
    * fusing q/k/v and gate/up into one product each saves three calls per layer (bf16 decode: -5%).
    The copy doubles the memory of what is packed. The output head (63% of the 270M) keeps none when the
    native kernel is there (`gemm_copy=False`): a many-token call on it is rare (perplexity) and goes
    through F.linear. Each PackedWeight remembers the tensors, storage and version of the weights it was
    made from, so once one changes (a training step, a LoRA merge, a new state dict) it stops matching and
    the plain modules are used again.
    """

    def __init__(self, *weights: torch.Tensor, gemm_copy: bool = True):
        """`gemm_copy=False` (the output head): no copy for many rows when the native kernel takes the
        few-row calls; a many-row call then goes through F.linear on the weight itself."""
        self.state = WeightState(weights)
        ws = [w.detach() for w in weights]
        self.bf16 = ws[0].dtype == torch.bfloat16
        # one or a few tokens (decode): the native kernel reads the weights in place, if it could be built
        self.rows = NativeLinear(ws) if kernels.available() else None
        self.packed = None
        # oneDNN's packed bf16 layout needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; elsewhere (an AVX2-only CPU)
        # a bf16 prefill goes through F.linear on the fused weight, which torch supports everywhere
        self.onednn = self.bf16 and _onednn_bf16()
        if self.rows is None or gemm_copy or len(ws) > 1:  # many tokens (prefill), or no native kernel
            w = torch.cat(ws) if len(ws) > 1 else ws[0]  # (sum of outs, in)
            if self.onednn:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
            else:
                self.packed = w if self.bf16 else w.t().contiguous()

    @staticmethod
    def supported(weight: torch.Tensor) -> bool:
        return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)

    def usable_for(self, *weights: torch.Tensor) -> bool:
        """True when `weights` are still what was packed and no gradient is wanted (the copy has none)."""
        return not torch.is_grad_enabled() and self.state.matches(weights)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            n = x.numel() // x.shape[-1]
            if n == 1 or (self.packed is None and n <= self.rows.max_rows):
                return self.rows(x)
        if self.packed is None:  # the head without a GEMM copy: its one weight, as the kernel holds it
            return F.linear(x, self.rows.weights[0])
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        if self.bf16:
            return F.linear(x, self.packed)
        return x @ self.packed


def _onednn_bf16() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def project(x: torch.Tensor, packed: PackedWeight | None, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """Each of `linears` applied to x: one matmul over their PackedWeight when there is one that still
    matches them (plain nn.Linear modules, weights unchanged), else one call per module (e.g. LoRA)."""
    if (packed is not None and all(type(m) is nn.Linear for m in linears)
            and packed.usable_for(*(m.weight for m in linears))):
        return packed(x).split([m.out_features for m in linears], dim=-1)
    return tuple(m(x) for m in linears)
