"""Attention for inference, swapped in for GroupedQueryAttention by gemma3.accel.accelerate: the same
softmax(q·kᵀ·scale + mask)·v, cut the way a CPU computes it fastest. Only `sdpa` differs from the model's
module; the projections, QK-norm and RoPE are the module's own code and its own parameters.

    one token (a decode step)   the native kernel over the cache in place (fp32 on the CPU: kernels/decode.c;
                                with native=False, never); else SDPA with the G query heads of a KV head
                                handed over as G queries of one head, which SDPA's CPU path reads far faster
                                than H heads with enable_gqa
    a plain causal prefill      one SDPA call per block of 128 queries, each over the keys up to its last
    of T >= 256, no autograd    query: the CPU flash kernel skips a key block only when it lies wholly above
                                the diagonal, so one call over T <= 512 computes every masked score too
    anything else               the model's own SDPA call

Each path computes the same scores and sums; outputs move by rounding only (docs/exactness.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma3 import kernels
from gemma3.model import GroupedQueryAttention

QUERY_BLOCK = 128  # queries per SDPA call in a blocked prefill

_SHARED = ("num_heads", "num_kv_heads", "head_dim", "scale", "softcap", "implementation")


class CPUAttention(GroupedQueryAttention):
    """GroupedQueryAttention with the inference paths above. Built around an existing module: it takes that
    module's settings and children (its parameters), so the state dict is unchanged."""

    def __init__(self, attn: GroupedQueryAttention, native: bool = True):
        nn.Module.__init__(self)
        for name in _SHARED:
            setattr(self, name, getattr(attn, name))
        for name, child in attn.named_children():
            setattr(self, name, child)
        self._lib = None  # None: a decode step stays on SDPA
        if native:
            self.use_native_kernel()

    def use_native_kernel(self) -> None:
        """Decode steps on kernels/decode.c where it is built (and where the step is fp32 on the CPU)."""
        self._lib = kernels.library()

    def sdpa(self, q, k, v, mask):
        T = q.shape[2]
        if T == 1:
            return self._decode(q, k, v, mask)
        if mask is None and T >= 2 * QUERY_BLOCK and not torch.is_grad_enabled():
            return self._causal_in_blocks(q, k, v)
        return super().sdpa(q, k, v, mask)

    def _decode(self, q, k, v, mask):
        """One new token per row. q (B, H, 1, hd), k/v (B, K, S, hd), mask (B, 1, 1, S) or None."""
        B, H, _, hd = q.shape
        S = k.shape[2]
        q = q.reshape(B, self.num_kv_heads, H // self.num_kv_heads, hd)  # (B, K, G, hd): no causal order among G
        if (self._lib is None or q.dtype != torch.float32 or q.device.type != "cpu" or k.stride() != v.stride()
                or k.stride()[2:] != (hd, 1) or (mask is not None and mask.shape != (B, 1, 1, S))):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            return out.view(B, H, 1, hd)
        q = q.contiguous()
        out = torch.empty_like(q)
        m = None if mask is None else mask.reshape(B, S).contiguous().view(torch.uint8)
        if self._lib.gemma3_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), B, self.num_kv_heads,
                                             q.shape[2], S, hd, k.stride(0), k.stride(1),
                                             None if m is None else m.data_ptr(), self.scale, out.data_ptr()):
            raise MemoryError("decode attention: out of memory for its partial sums")
        return out.view(B, H, 1, hd)

    def _causal_in_blocks(self, q, k, v):
        """Plain causal attention from position 0, one SDPA call per block of queries."""
        T = q.shape[2]
        gqa = self.num_kv_heads != self.num_heads
        outs = []
        for start in range(0, T, QUERY_BLOCK):
            end = min(T, start + QUERY_BLOCK)
            if start == 0:  # the top-left block is itself plainly causal
                mask = None
            else:  # query start + i sees keys j <= start + i
                mask = torch.ones(end - start, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
            outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=mask,
                                                       is_causal=mask is None, scale=self.scale, enable_gqa=gqa))
        return torch.cat(outs, dim=2)
