"""Float weights to GGUF Q4_K blocks, for `gemma3 convert --to gguf --gguf-type Q4_K` (gguf-py, which writes
our other block types, has no K-quant quantizer).

Q4_K packs 256 values (a super-block) in 144 bytes: eight sub-blocks of 32, each value a 4-bit code q with
value = d · sc_j · q − dmin · mn_j, where sc_j and mn_j are the sub-block's 6-bit scale and min and d, dmin
the super-block's fp16 factors (4.5 bits a weight). The fit follows the shape of llama.cpp's reference
quantizer (`quantize_row_q4_K_ref` / `make_qkx2_quants`), written here in torch over all blocks at once:

1. each sub-block's (scale, min) by weighted least squares over 21 candidate grids around the min/max one,
   the weights |x| + RMS of the sub-block (large values carry the products), the min kept ≤ 0 so that it
   fits an unsigned 6-bit min;
2. the eight scales (and mins) rounded to 6 bits of the largest, d = largest / 63;
3. the codes taken once more from the rounded factors, so they are the best codes for what is stored.

Rows whose length is not a multiple of 256 cannot be Q4_K: the writer gives those Q5_0, as llama.cpp does.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K, SUB = 256, 32
BLOCK_BYTES = 144
STEPS = 20  # candidate grids d = range / (15 - 1 + 0.1 i), i = 0..20, plus range / 15


def _solve(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, offset, error) minimising Σ w (q · scale + offset − x)² with offset ≤ 0, per row."""
    sw, swq, swq2 = w.sum(-1), (w * q).sum(-1), (w * q * q).sum(-1)
    swx, swxq = (w * x).sum(-1), (w * x * q).sum(-1)
    det = sw * swq2 - swq * swq
    ok = det > 0
    safe = torch.where(ok, det, torch.ones_like(det))
    d = torch.where(ok, (sw * swxq - swq * swx) / safe, torch.zeros_like(det))
    m = torch.where(ok, (swq2 * swx - swq * swxq) / safe, torch.zeros_like(det))
    positive = m > 0  # the offset must be a non-negative min subtracted: refit the scale through 0
    d = torch.where(positive, swxq / torch.where(swq2 > 0, swq2, torch.ones_like(swq2)), d)
    m = torch.where(positive, torch.zeros_like(m), m)
    err = (w * (q * d[:, None] + m[:, None] - x) ** 2).sum(-1)
    return d, m, err


def _codes(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    return torch.round((x - m[:, None]) * inv[:, None]).clamp(0, 15)


def _fit_sub_blocks(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale ≥ 0, min ≥ 0) per sub-block row of x (R, 32): value ≈ q · scale − min."""
    lo = x.min(-1).values.clamp(max=0.0)
    hi = x.max(-1).values
    span = hi - lo
    best_d, best_m = span / 15, lo
    best_err = _solve(x, w, _codes(x, best_d, lo))[2]  # the min/max grid itself, as a candidate too
    best_err = torch.where(span > 0, best_err, torch.zeros_like(best_err))
    for i in range(STEPS + 1):
        d, m, err = _solve(x, w, _codes(x, span / (14.0 + 0.1 * i), lo))
        better = (err < best_err) & (span > 0)
        best_d, best_m, best_err = torch.where(better, d, best_d), torch.where(better, m, best_m), torch.where(better, err, best_err)
    best_d = best_d.clamp(min=0.0)
    return best_d, -best_m


def _six_bits(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per super-block (B, 8) non-negative factors → (fp16 unit, 6-bit codes) with v ≈ unit · code."""
    top = v.max(-1).values
    inv = torch.where(top > 0, 63 / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(top))
    return (top / 63).to(torch.float16), torch.round(v * inv[:, None]).clamp(0, 63).to(torch.uint8)


def quantize_q4_k(weight: torch.Tensor, chunk: int = 1 << 14) -> np.ndarray:
    """(N, K) float weights, K a multiple of 256, finite → (N, K / 256 · 144) uint8 Q4_K blocks."""
    n, k = weight.shape
    if k % QK_K:
        raise ValueError(f"Q4_K needs rows of a multiple of {QK_K} values, not {k}")
    x_all = weight.detach().reshape(-1, QK_K)
    out = np.empty((x_all.shape[0], BLOCK_BYTES), dtype=np.uint8)
    for start in range(0, x_all.shape[0], chunk):  # in float64 a chunk at a time
        x = x_all[start:start + chunk].to(torch.float64)
        B = x.shape[0]
        subs = x.reshape(B * 8, SUB)
        w = subs.abs() + subs.pow(2).mean(-1, keepdim=True).sqrt()
        scale, minimum = _fit_sub_blocks(subs, w)
        d, sc = _six_bits(scale.reshape(B, 8))
        dmin, mn = _six_bits(minimum.reshape(B, 8))
        # the codes once more, from what is stored
        step = (d.double()[:, None] * sc.double()).reshape(-1)
        offset = (dmin.double()[:, None] * mn.double()).reshape(-1)
        q = _codes(subs, step, -offset).to(torch.uint8).reshape(B, 4, 2, SUB)
        qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(B, 128)
        sc, mn = sc.to(torch.int32), mn.to(torch.int32)
        packed = torch.empty(B, 12, dtype=torch.int32)
        packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
        packed[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
        packed[:, 8:12] = (sc[:, 4:8] & 15) | ((mn[:, 4:8] & 15) << 4)
        block = out[start:start + B]
        block[:, 0:2] = d.numpy().view(np.uint8).reshape(B, 2)
        block[:, 2:4] = dmin.numpy().view(np.uint8).reshape(B, 2)
        block[:, 4:16] = packed.to(torch.uint8).numpy()
        block[:, 16:144] = qs.numpy()
    return out.reshape(n, (k // QK_K) * BLOCK_BYTES)
