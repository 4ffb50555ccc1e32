"""Attention in training: packed rows one document at a time, in autocast's dtype.

A packed row holds several conversations, each starting again at position 0; the model's mask keeps each one
to itself (gemma3.model.attention_mask). Over the whole (T, T) mask the fused kernel computes every score of
the row and cannot skip the masked blocks; document by document, each is a plain causal attention (the kernel's
is_causal path, which skips the upper half) over its own length. Two documents of 1 024 tokens in a row of
2 048: a quarter of the scores, and 3x faster forward and backward on CPU (docs/training.md, the command there).
The result is the same attention, to the order of fp32 additions.

Under autocast (bf16 training), q and k leave RoPE in fp32 (the rotation tables follow the fp32 residual
stream) while v is bf16, and the fused kernel then runs in fp32; cast to autocast's dtype, it runs in bf16
(1.7x faster here), accumulating in fp32 as it does for bf16 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma3.model import GroupedQueryAttention, PackedMask


class TrainingAttention(GroupedQueryAttention):
    """GroupedQueryAttention whose `sdpa` attends a `PackedMask` document by document, in autocast's dtype."""

    def sdpa(self, q, k, v, mask):
        if torch.is_autocast_enabled(q.device.type):
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if not isinstance(mask, PackedMask):
            return super().sdpa(q, k, v, mask)
        if mask.spans is None:
            mask.spans = document_spans(mask.positions)
        if mask.spans is False:  # positions this kernel cannot read as documents: the whole mask
            return super().sdpa(q, k, v, mask)
        gqa = self.num_kv_heads != self.num_heads
        rows = []
        for b, spans in enumerate(mask.spans):
            parts = []
            for start, end in spans:
                qs, ks, vs = q[b:b + 1, :, start:end], k[b:b + 1, :, start:end], v[b:b + 1, :, start:end]
                if mask.window is None or end - start <= mask.window:
                    parts.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale,
                                                                enable_gqa=gqa))
                else:  # a document longer than the sliding window: its own block of the mask
                    parts.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask.mask[b:b + 1, :, start:end, start:end],
                                                                scale=self.scale, enable_gqa=gqa))
            rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
        return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


def document_spans(positions: torch.Tensor) -> list[list[tuple[int, int]]] | bool:
    """For each row, the (start, end) of each document: a run that starts at position 0 and counts up, with any
    padding (-1) after it in the same run (padding attends only to what precedes it, and nothing real attends
    to padding that follows). False where a row is not of that shape (the caller falls back to the mask)."""
    out = []
    for row in positions.tolist():
        starts = [i for i, p in enumerate(row) if p == 0]
        if not starts or any(p != -1 for p in row[:starts[0]]):
            return False
        bounds = ([0] if starts[0] else []) + starts + [len(row)]  # leading padding is a run of its own
        spans = []
        for start, end in zip(bounds, bounds[1:]):
            seq = row[start:end]
            real = next((i for i, p in enumerate(seq) if p == -1), len(seq))
            if seq[:real] != list(range(real)) or any(p != -1 for p in seq[real:]):
                return False
            spans.append((start, end))
        out.append(spans)
    return out


def use_training_attention(model: nn.Module) -> nn.Module:
    """Swap every attention module of `model` for TrainingAttention (its parameters and state unchanged)."""
    for module in model.modules():
        if type(module) is GroupedQueryAttention:
            module.__class__ = TrainingAttention
    return model
