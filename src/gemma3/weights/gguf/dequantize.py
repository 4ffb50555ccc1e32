"""ggml's block layouts (`ggml-quants.c`) dequantised with vectorised numpy: the one numpy implementation, used
by the GGUF reader and by gemma3.accel.quantize when its native kernels (gemma3/kernels/quants.c) are missing.

Each function maps [blocks, block_bytes] uint8 to [blocks, block_elements] float32; tests check every one
against gguf-py's `gguf.quants.dequantize` (the reference) and against the native kernel on random blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


# numpy rather than torch: torch's uint8 bit operations on CPU are much slower on these small, strided block
# views (docs/models-and-conversion.md has the figure).
def _f16(cols: np.ndarray) -> np.ndarray:
    """Two bytes per row -> one float32 per row, shape [B, 1]."""
    return np.ascontiguousarray(cols).view("<f2").astype(np.float32)


def _dq_f32(b: np.ndarray) -> np.ndarray:
    return b.view("<f4")


def _dq_f16(b: np.ndarray) -> np.ndarray:
    return b.view("<f2").astype(np.float32)


def _dq_bf16(b: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32: widen by shifting the bits into place.
    return (b.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _dq_q8_0(b: np.ndarray) -> np.ndarray:
    # block: f16 scale, 32 x int8
    out = b[:, 2:].view(np.int8).astype(np.float32)
    out *= _f16(b[:, :2])
    return out


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes of 4-bit codes -> the block's 32 codes: value j is qs[j] & 15 for j < 16, qs[j - 16] >> 4 after."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _dq_q4_0(b: np.ndarray) -> np.ndarray:
    # block: f16 scale, 16 bytes of nibbles. Values are offset by 8.
    out = _nibbles(b[:, 2:18]).astype(np.float32)
    out -= 8
    out *= _f16(b[:, :2])
    return out


def _dq_q4_1(b: np.ndarray) -> np.ndarray:
    # block: f16 scale d, f16 min m, 16 bytes of nibbles; value = d * q + m.
    out = _nibbles(b[:, 4:20]).astype(np.float32)
    out *= _f16(b[:, :2])
    out += _f16(b[:, 2:4])
    return out


def _dq_q5_0(b: np.ndarray) -> np.ndarray:
    # block: f16 scale, 32 high bits (u32), 16 bytes of nibbles. Value j's low four bits are its nibble
    # (_nibbles), its fifth bit is bit j of the u32. Values are offset by 16.
    high = ((np.ascontiguousarray(b[:, 2:6]).view("<u4") >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    out = (_nibbles(b[:, 6:22]) | (high << 4)).astype(np.float32)
    out -= 16
    out *= _f16(b[:, :2])
    return out


def _dq_q4_k(b: np.ndarray) -> np.ndarray:
    # super-block of 256 = 8 sub-blocks of 32: f16 d, f16 dmin, 12 bytes of packed 6-bit scales and mins,
    # 128 bytes of nibbles (sub-block 2j in the low nibbles of bytes 32j..32j+31, 2j+1 in the high ones).
    d, dmin, s, qs = _f16(b[:, 0:2]), _f16(b[:, 2:4]), b[:, 4:16], b[:, 16:144]
    scale = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1) * d
    minimum = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1) * dmin
    q = qs.reshape(-1, 4, 1, 32)
    q = np.concatenate([q & 15, q >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)  # (B, sub-block, 32)
    q *= scale[:, :, None]
    q -= minimum[:, :, None]
    return q.reshape(-1, 256)


def _dq_q6_k(b: np.ndarray) -> np.ndarray:
    # super-block of 256 = 16 groups of 16: 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 int8 scales,
    # f16 d. Each half (128 values) takes 64 low bytes and 32 high bytes; its four 32-value runs are
    # (low nibble of ql[0:32], bits 0-1), (low of ql[32:64], bits 2-3), (high of ql[0:32], bits 4-5),
    # (high of ql[32:64], bits 6-7). Values are offset by 32.
    ql = b[:, 0:128].reshape(-1, 2, 1, 64)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    scales = b[:, 192:208].view(np.int8).astype(np.float32) * _f16(b[:, 208:210])
    lo, hi = ql[..., :32], ql[..., 32:]
    q = np.concatenate([
        (lo & 15) | ((qh & 3) << 4),
        (hi & 15) | (((qh >> 2) & 3) << 4),
        (lo >> 4) | (((qh >> 4) & 3) << 4),
        (hi >> 4) | (((qh >> 6) & 3) << 4),
    ], axis=2).reshape(-1, 16, 16).astype(np.float32)  # (B, group, 16)
    q -= 32
    q *= scales[:, :, None]
    return q.reshape(-1, 256)


DEQUANTISERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": _dq_f32, "F16": _dq_f16, "BF16": _dq_bf16, "Q8_0": _dq_q8_0, "Q4_0": _dq_q4_0, "Q4_1": _dq_q4_1,
    "Q5_0": _dq_q5_0, "Q4_K": _dq_q4_k, "Q6_K": _dq_q6_k,
}


def dequantize_blocks(type_name: str, blocks: np.ndarray) -> np.ndarray | None:
    """[blocks, block_bytes] uint8 of ggml type `type_name` as [blocks, block_elements] float32, or None
    for a type without a numpy dequantiser here."""
    fn = DEQUANTISERS.get(type_name)
    return None if fn is None else fn(blocks)

