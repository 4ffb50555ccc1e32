"""Float (fp32 / bf16) weights on the CPU, for inference: modules swapped in for the model's own by
`use_native_modules` (called by gemma3.accel.accelerate), each keeping the module's own Parameter, so the
state dict is unchanged.

    PackedLinear     replaces an nn.Linear: one or a few rows (decode) → the native GEMV reading the weight
                     in place; many rows (prefill) → a copy in the layout the CPU's GEMM reads fastest
    NativeEmbedding  replaces the tied embedding: the same lookup, and its `attend` (the output head, most of
                     the bytes a decode step reads) on the native GEMV with no copy at all
    NativeRMSNorm    replaces RMSNorm: (1 + w) in fp32 computed once instead of at every call, and fp32 inputs
                     through one fused native call (kernels/decode.c)
    NativeGeGLU      replaces a quantized model's FeedForward: gelu_tanh(gate) · up in fp32 by decode.c's
                     function, the one the fused decode step calls, so the modules and the fused step compute
                     the same bits (torch's own tanh differs from it by an ulp or two on some values)

Each remembers the tensor, storage and in-place version it derived its copy from (`WeightState`): once the
weight changes (an optimizer step, `load_state_dict`, a LoRA merge) or autograd is on, it computes from the
weight itself, exactly as the plain module. FSDP2's gathers write a parameter without bumping its version,
which is one reason training never calls this. The GEMM and the decode kernel sum in different orders, so a
cached decode and a full forward differ by rounding (docs/exactness.md); figures: docs/performance.md.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gemma3 import kernels
from gemma3.accel.quantize import QuantizedLinear
from gemma3.accel.swap import swap_modules
from gemma3.kernels import NativeLinear
from gemma3.model import FeedForward, RMSNorm, TiedEmbedding


class WeightState:
    """What a copy derived from some weights was derived from: those very tensor objects, in that storage,
    at that in-place version. It stops matching once one of them changes in place (an optimizer step,
    `load_state_dict`) or is replaced by another tensor, even one whose memory reuses the old address."""

    def __init__(self, weights: Sequence[torch.Tensor]):
        self.refs = [weakref.ref(w) for w in weights]
        self.keys = [_key(w) for w in weights]

    def matches(self, weights: Sequence[torch.Tensor]) -> bool:
        return len(weights) == len(self.refs) and all(
            ref() is w and key == _key(w) for ref, key, w in zip(self.refs, self.keys, weights))


def _key(w: torch.Tensor) -> tuple[int, int]:
    # a tensor made under inference_mode has no version counter (and can only change inside inference_mode)
    return w.data_ptr(), -1 if w.is_inference() else w._version


def _onednn_bf16() -> bool:
    """oneDNN's packed bf16 layout needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; elsewhere (an AVX2-only CPU)
    a bf16 prefill goes through F.linear, which torch supports everywhere."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """An nn.Linear (no bias) with a decode kernel and a GEMM copy; the same Parameter, the same results up
    to the order of fp32 additions."""

    def __init__(self, linear: nn.Linear, gemm_copy: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        w = linear.weight.detach()
        self.state = WeightState((linear.weight,))
        self.bf16 = w.dtype == torch.bfloat16
        self.rows = NativeLinear([w]) if kernels.available() else None  # one or a few tokens, read in place
        self.onednn = self.bf16 and _onednn_bf16()
        self.packed = None
        if gemm_copy or self.rows is None:  # many tokens (prefill), or no native kernel
            if self.onednn:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
            elif not self.bf16:
                self.packed = w.t().contiguous()  # (in, out), used as x @ Wᵀ

    def usable(self) -> bool:
        return not torch.is_grad_enabled() and self.state.matches((self.weight,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.usable():
            return F.linear(x, self.weight)
        rows = x.numel() // self.in_features
        if self.rows is not None and (rows == 1 or (self.packed is None and rows <= self.rows.max_rows)):
            return self.rows(x)
        if self.packed is None:
            return F.linear(x, self.weight)
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return x @ self.packed

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, native={self.rows is not None}"


class NativeEmbedding(TiedEmbedding):
    """The tied embedding with the head on the native kernel: few rows read the table in place; many rows
    (a perplexity window) go through F.linear on the same table, so no copy of its 168M values is made."""

    def __init__(self, embedding: nn.Embedding):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.weight = embedding.weight
        self.state = WeightState((embedding.weight,))
        self.rows = NativeLinear([embedding.weight.detach()]) if kernels.available() else None

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        rows = h.numel() // self.embedding_dim
        if (self.rows is not None and rows <= self.rows.max_rows and not torch.is_grad_enabled()
                and self.state.matches((self.weight,))):
            return self.rows(h)
        return F.linear(h, self.weight)

class NativeRMSNorm(RMSNorm):
    """RMSNorm reusing its fp32 gain (1 + w) while the weight is the one it was computed from; fp32 inputs go
    to the fused native kernel (kernels/decode.c: one call instead of F.rms_norm's several dispatched ops;
    docs/performance.md has the figures)."""

    def __init__(self, norm: RMSNorm):
        nn.Module.__init__(self)
        self.eps, self.weight = norm.eps, norm.weight
        self._state, self._gain = WeightState((norm.weight,)), 1.0 + norm.weight.detach().float()
        self._lib = kernels.library()

    def usable(self) -> bool:
        return not torch.is_grad_enabled() and self._state.matches((self.weight,))

    def gain(self) -> torch.Tensor:
        return self._gain if self.usable() else 1.0 + self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._lib is None or x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu" \
                or not self.usable():
            return super().forward(x)
        out = torch.empty_like(x)
        dim = x.shape[-1]
        self._lib.gemma3_rms_norm(x.data_ptr(), self._gain.data_ptr(), x.numel() // dim, dim, self.eps, out.data_ptr())
        return out

class NativeGeGLU(FeedForward):
    """FeedForward whose GeGLU middle, for fp32 activations on the CPU without autograd, is decode.c's
    gemma3_gelu_tanh_mul, row by row as the fused decode step applies it (the projections are the module's own)."""

    def __init__(self, ffn: FeedForward):
        nn.Module.__init__(self)
        self.gate_proj, self.up_proj, self.down_proj = ffn.gate_proj, ffn.up_proj, ffn.down_proj
        self._lib = kernels.library()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._lib is None or torch.is_grad_enabled() or x.device.type != "cpu":
            return super().forward(x)
        g, u = self.gate_proj(x), self.up_proj(x)
        if g.dtype != torch.float32 or u.dtype != torch.float32:
            return self.down_proj(F.gelu(g, approximate="tanh") * u)
        g, u = g.contiguous(), u.contiguous()
        out = torch.empty_like(g)
        n = g.shape[-1]
        rows = 1 if n % 8 == 0 else g.numel() // n  # a row's last values are its own scalar tail, as in the step
        for r in range(rows):
            at, count = r * n * 4, g.numel() if rows == 1 else n
            self._lib.gemma3_gelu_tanh_mul(g.data_ptr() + at, u.data_ptr() + at, count, out.data_ptr() + at)
        return self.down_proj(out)


def supported(model: nn.Module) -> bool:
    w = model.embed_tokens.weight if isinstance(model.embed_tokens, nn.Embedding) else None
    return w is not None and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16)


def use_native_modules(model: nn.Module) -> nn.Module:
    """Swap in the native modules: for float weights on the CPU, PackedLinear and NativeEmbedding (plain
    nn.Linear / TiedEmbedding only: a LoRA-wrapped or quantized module is left as it is); for any CPU model,
    NativeRMSNorm (a quantized model computes its activations in fp32 too); for a quantized FeedForward,
    NativeGeGLU."""
    norm = next((m for m in model.modules() if type(m) is RMSNorm), None)
    if norm is None or norm.weight.device.type != "cpu":
        return model
    head, float_weights = model.embed_tokens, supported(model)

    def replace(m: nn.Module):
        if float_weights and type(m) is nn.Linear and m.bias is None:
            return PackedLinear(m)
        if float_weights and type(m) is TiedEmbedding and m is head:
            return NativeEmbedding(m)
        if type(m) is RMSNorm:
            return NativeRMSNorm(m)
        if (type(m) is FeedForward and isinstance(m.gate_proj, QuantizedLinear)
                and isinstance(m.up_proj, QuantizedLinear)):
            return NativeGeGLU(m)
        return None

    swap_modules(model, replace)
    return model
