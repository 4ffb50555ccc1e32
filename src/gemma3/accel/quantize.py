"""Quantized inference: weights kept in ggml's block formats, swapped into the model from outside.

A batch-1 decode step reads every weight once, so on a CPU it runs at (bytes per token) / (memory bandwidth).
In bf16 the 270M reads 536 MB a token, 335 MB of it the tied 262 144 × 640 output head; the embedded Q4_K_M
GGUF holds the same model in 247 MB. This module keeps such weights as they are in the file — no
dequantization at load — and multiplies by them with gemma3/kernels/quants.c, which explains the numerics.

    QuantizedTensor      an (out, in) matrix in one of FORMATS: the raw blocks, byte for byte ggml's
    QuantizedLinear      replaces an nn.Linear (q/k/v/o, gate/up/down): few rows → the block kernel,
                         many rows (a prefill) → weight tiles dequantized into an fp32 GEMM
    QuantizedEmbedding   replaces the tied embedding: a lookup dequantizes only the rows it reads, and
                         `attend` is the output head over the same blocks (the table is held once)
    quantize_model       swaps them in: from a GGUF's own blocks, or quantizing float weights at load

The model file never learns about any of this (gpt-fast's `quantize.py` and torchao's `quantize_` work the
same way), and training keeps the plain modules. SCHEMES names what `--quantize` offers for float weights:

    int8  Q8_0 everywhere: symmetric, one fp16 scale per 32 values (8.5 bits a weight)
    int4  Q4_1 for q, o, gate, up and down (4-bit codes, an fp16 scale and min per 32 values: 5 bits a
          weight; each block's grid fitted by least squares, kernels/quantize.c, weighted by an importance
          matrix measured at load on a calibration text, gemma3/imatrix.py); Q8_0 for k, v, the tied
          embedding / head, and down in the layers llama.cpp's Q4_K_M gives ffn_down more bits (the first and
          last eighth, every third between: more_bits_layer): 5.6 bits a weight in the layers. Measured on the
          270M (1 024 tokens, against fp32; the README's table): min/max Q4_1 everywhere but the head +28.7 %,
          fitted +12.3 %, k and v at Q8_0 +5.4 %, weighted by the importance matrix +2.9 %, down at Q8_0 in 9
          layers +1.3 % (3 072 tokens: +1.8 % of bf16); a Q4_1 head alone costs +10 %

Without the native kernels (no C compiler, not x86-64 with AVX2) the same arithmetic runs in torch —
dequantized weights, the activation rounded exactly as the kernel rounds it — much slower, and
`kernels.status()` says why in one line.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gemma3 import kernels
from gemma3.errors import CheckpointError, Gemma3Error
from gemma3.model import chunked_cross_entropy
from gemma3.weights.gguf.dequantize import dequantize_blocks
from gemma3.weights.names import QUANTIZABLE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Format:
    name: str
    ggml_type: int  # ggml's type id (GGUF's tensor type)
    block_values: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_values


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("Q8_0", 8, 32, 34), Format("Q4_0", 2, 32, 18), Format("Q4_1", 3, 32, 20), Format("Q5_0", 6, 32, 22),
    Format("Q4_K", 12, 256, 144), Format("Q6_K", 14, 256, 210),
)}
LAYER_INDEX = re.compile(r"layers\.(\d+)\.")  # a decoder layer's weight name: 'layers.17.mlp.down_proj.weight'


def more_bits_layer(layer: int, n_layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third one between —
    where its Q4_K_M stores ffn_down (and attn_v) at 6 bits. On the 270M: layers 0, 1, 4, 7, 10, 13, 15, 16, 17
    (the embedded file's Q6_K ffn_down layers)."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class Scheme:
    """What `--quantize NAME` makes of float weights: `layers` for the projections, `embedding` for the tied
    embedding / head; projections (by module name) kept at Q8_0: `eight_bit` in every layer, `eight_bit_some`
    in the layers more_bits_layer picks; `calibrated`: its Q4_1 fits are weighted by an importance matrix
    (gemma3/imatrix.py) where the loader can measure one."""
    layers: str
    embedding: str
    eight_bit: tuple[str, ...] = ()
    eight_bit_some: tuple[str, ...] = ()
    calibrated: bool = False

    def format_of(self, name: str, n_layers: int) -> str:
        if name == "embed_tokens.weight":
            return self.embedding
        if any(f".{part}." in name for part in self.eight_bit):
            return "Q8_0"
        layer = LAYER_INDEX.match(name)
        if layer and any(f".{part}." in name for part in self.eight_bit_some) and more_bits_layer(
                int(layer.group(1)), n_layers):
            return "Q8_0"
        return self.layers


SCHEMES = {"int8": Scheme("Q8_0", "Q8_0"),
           "int4": Scheme("Q4_1", "Q8_0", ("k_proj", "v_proj"), ("down_proj",), calibrated=True)}
ACTIVATION_BLOCK = 32  # the kernel rounds x to int16 per this many values
ACTIVATION_CODE_MAX = 32639.0  # the largest |code| (kernels/quants.c CODE_MAX)
MAX_KERNEL_ROWS = 8  # rows of x per kernel call (quants.c MAX_ROWS)
# Up to this many rows (a server's batched decode step) the kernel runs on 8 rows at a time: for 16 rows that
# is 2-6× faster than dequantizing the weight for a GEMM (measured on the 270M's layers and head), and each row
# keeps the bits it has alone. More rows (a prefill) go to the dequantized GEMM.
MAX_DECODE_ROWS = 32
GEMM_TILE_BYTES = 64 << 20  # fp32 weight dequantized at a time for a many-row product


# ---------------------------------------------------------------------------------------------- tensors
class QuantizedTensor:
    """An (out, in) matrix in a block format: `data` holds its rows of blocks, (out, row_bytes) uint8.

    When `in` is not a multiple of the format's block, the rows were zero-padded to one at quantization
    (`padded_in`), and inputs are padded the same way (zero weights add nothing)."""

    def __init__(self, fmt: str, data: torch.Tensor, shape: tuple[int, int]):
        if fmt not in FORMATS:
            raise CheckpointError(f"no native kernel for {fmt} (native: {', '.join(FORMATS)})")
        self.format = FORMATS[fmt]
        out, inp = shape
        padded = -(-inp // self.format.block_values) * self.format.block_values
        row_bytes = padded // self.format.block_values * self.format.block_bytes
        if data.dtype != torch.uint8 or data.numel() != out * row_bytes:
            raise CheckpointError(f"{fmt} data for a {out}×{inp} matrix must be {out * row_bytes} bytes, "
                                  f"got {data.numel()} ({data.dtype})")
        self.data = data.reshape(out, row_bytes)
        self.shape = (out, inp)
        self.padded_in = padded

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.format.name}, {self.shape[0]}×{self.shape[1]})"

    @classmethod
    def quantize(cls, weight: torch.Tensor, fmt: str, importance: torch.Tensor | None = None) -> "QuantizedTensor":
        """A float (out, in) matrix in `fmt`: Q4_1 by a least-squares fit of each block's scale and min
        (kernels/quantize.c explains it; `_fit_q4_1_torch` without the kernels), weighted per column by
        `importance` (in,) where given (gemma3/imatrix.py); the others with gguf-py's quantizers (llama.cpp's
        reference ones) — Q8_0 by kernels/quantize.c where it is built, the same bytes."""
        import gguf as gguf_py

        if fmt not in ("Q8_0", "Q4_0", "Q4_1", "Q5_0"):
            raise Gemma3Error(f"cannot quantize to {fmt} (can: Q8_0, Q4_0, Q4_1, Q5_0)")
        w = weight.detach().float().cpu()
        amax = float(w.abs().max()) if w.numel() else 0.0  # NaN or inf if any value is
        if not math.isfinite(amax):
            raise Gemma3Error(f"cannot quantize a weight holding NaN or inf values (shape {tuple(w.shape)})")
        if amax > FP16_MAX:
            raise Gemma3Error(f"cannot quantize a weight with values beyond ±{FP16_MAX:.0f} (the block scales are "
                              f"fp16; shape {tuple(w.shape)})")
        out, inp = w.shape
        block = FORMATS[fmt].block_values
        if inp % block:
            w = F.pad(w, (0, block - inp % block))
        if fmt == "Q4_1":
            if importance is not None and inp % block:
                importance = F.pad(importance.float(), (0, block - inp % block), value=1.0)
            return cls(fmt, fit_q4_1(w.contiguous(), importance).reshape(-1), (out, inp))
        lib = kernels.library()
        if fmt == "Q8_0" and lib is not None:  # gguf-py's bytes, from kernels/quantize.c
            w = w.contiguous()
            blocks = torch.empty(w.numel() // 32 * 34, dtype=torch.uint8)
            lib.gemma3_quantize_q8_0(w.data_ptr(), out, w.shape[1], blocks.data_ptr())
            return cls(fmt, blocks, (out, inp))
        blocks = gguf_py.quants.quantize(w.numpy(), gguf_py.GGMLQuantizationType[fmt])
        return cls(fmt, torch.from_numpy(np.ascontiguousarray(blocks)).reshape(-1), (out, inp))

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The matrix (or the rows `rows` names, an int64 tensor) as fp32."""
        out, inp = self.shape
        ids = None if rows is None else rows.reshape(-1).to(torch.int64).contiguous()
        if ids is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= out):
            raise Gemma3Error(f"{self}: row ids must be in [0, {out}), got {int(ids.min())}..{int(ids.max())}")
        count = out if ids is None else ids.numel()
        lib = kernels.library()
        if lib is not None:
            result = torch.empty(count, self.padded_in, dtype=torch.float32)
            rc = lib.gemma3_q_dequantize(self.format.ggml_type, self.data.data_ptr(), self.data.shape[1], out,
                                         self.padded_in, None if ids is None else ids.data_ptr(), count,
                                         result.data_ptr())
            if rc:
                raise Gemma3Error(f"dequantizing {self}: kernel error {rc}")
        else:
            rows = (self.data if ids is None else self.data[ids]).numpy()
            blocks = dequantize_blocks(self.format.name, rows.reshape(-1, self.format.block_bytes))
            result = torch.from_numpy(blocks.reshape(count, self.padded_in))
        return result[:, :inp] if inp != self.padded_in else result

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, in) fp32 → x · Wᵀ (M, out) fp32. M ≤ MAX_KERNEL_ROWS: the block kernel (x rounded to int16 per
        32 values); more rows: W dequantized a tile at a time into fp32 GEMMs (x exact)."""
        out, inp = self.shape
        if x.shape[-1] != inp:
            raise Gemma3Error(f"{self}: input has {x.shape[-1]} features, expected {inp}")
        if self.padded_in != inp:
            x = F.pad(x, (0, self.padded_in - inp))
        x = x.contiguous()
        rows = x.shape[0]
        lib = kernels.library()
        if rows <= MAX_DECODE_ROWS:
            if lib is None:
                return F.linear(round_activation(x), self.dequantize_padded())
            y = torch.empty(rows, out, dtype=torch.float32)
            for start in range(0, rows, MAX_KERNEL_ROWS):
                n = min(MAX_KERNEL_ROWS, rows - start)
                rc = lib.gemma3_q_linear(self.format.ggml_type, self.data.data_ptr(), self.data.shape[1], out,
                                         self.padded_in, x[start:].data_ptr(), n, y[start:].data_ptr())
                if rc:
                    raise Gemma3Error(f"{self}: kernel error {rc}")
            return y
        tile = max(1, GEMM_TILE_BYTES // (4 * self.padded_in))
        if tile >= out:
            return F.linear(x, self.dequantize_padded())
        parts = []
        for start in range(0, out, tile):
            part = self.data[start:start + tile]
            w = QuantizedTensor(self.format.name, part.reshape(-1), (part.shape[0], inp)).dequantize_padded()
            parts.append(F.linear(x, w))
        return torch.cat(parts, dim=-1)

    def dequantize_padded(self) -> torch.Tensor:
        w = self.dequantize()
        return w if self.padded_in == self.shape[1] else F.pad(w, (0, self.padded_in - self.shape[1]))


FP16_MAX = 65504.0
FIT_STEPS, FIT_REFINE = 20, 3  # kernels/quantize.c's STEPS and REFINE


def fit_q4_1(w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Q4_1 blocks (N · K/32, 20) uint8 of a finite fp32 (N, K) matrix, K a multiple of 32: each block's grid
    fitted by least squares (kernels/quantize.c), or the same arithmetic in torch without the kernels.
    `importance` (K,) positive: the fit's weight per column instead of the default |x| + mean |x|."""
    n, k = w.shape
    if importance is not None:
        importance = importance.detach().float().cpu().contiguous()
        if importance.shape != (k,) or not bool((importance > 0).all()) or not bool(torch.isfinite(importance).all()):
            raise Gemma3Error(f"Q4_1 importance must be {k} positive finite weights, got {tuple(importance.shape)}")
    lib = kernels.library()
    if lib is None:
        return _fit_q4_1_torch(w, importance)
    blocks = torch.empty(n * (k // 32), 20, dtype=torch.uint8)
    lib.gemma3_fit_q4_1(w.data_ptr(), n, k, None if importance is None else importance.data_ptr(), blocks.data_ptr())
    return blocks


def _fit_q4_1_torch(w: torch.Tensor, importance: torch.Tensor | None = None, chunk: int = 1 << 16) -> torch.Tensor:
    """quantize.c's Q4_1 fit in torch, `chunk` blocks at a time (equal to it but for ties in the last rounding)."""
    x_all = w.reshape(-1, 32)
    imp = None  # the importance of each block's 32 columns, block by block as x_all holds them
    if importance is not None:
        imp = importance.double().reshape(1, -1, 32).expand(w.shape[0], -1, -1).reshape(-1, 32)
    out = torch.empty(x_all.shape[0], 20, dtype=torch.uint8)

    def codes(x, d, m):
        inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, 1.0), 0.0)
        return torch.round((x - m) * inv).clamp(0, 15)

    def solve(x, wt, q, d, m):
        sw, swq, swq2 = wt.sum(1, True), (wt * q).sum(1, True), (wt * q * q).sum(1, True)
        swx, swxq = (wt * x).sum(1, True), (wt * x * q).sum(1, True)
        det = sw * swq2 - swq * swq
        ok = det > 0
        safe = torch.where(ok, det, 1.0)
        d = torch.where(ok, (sw * swxq - swq * swx) / safe, d)
        m = torch.where(ok, (swq2 * swx - swq * swxq) / safe, m)
        return d, m, (wt * (q * d + m - x) ** 2).sum(1, True)

    for start in range(0, x_all.shape[0], chunk):
        x = x_all[start:start + chunk].double()
        lo, hi = x.min(1, True).values, x.max(1, True).values
        if imp is None:
            wt = x.abs() + x.abs().mean(1, True)
        else:
            wt = imp[start:start + chunk] * torch.sqrt((x * x).mean(1, True) + x * x)
        rng = hi - lo
        best_d, best_m = rng / 15, lo.clone()
        best_err = torch.full_like(lo, float("inf"))
        flat = rng <= 0
        for i in range(-1, FIT_STEPS + 1):
            d0 = rng / (15.0 if i < 0 else 14.0 + 0.1 * i)
            d, m, err = solve(x, wt, codes(x, d0, lo), d0, lo)
            better = (err < best_err) & ~flat
            best_d, best_m, best_err = (torch.where(better, a, b) for a, b in ((d, best_d), (m, best_m), (err, best_err)))
        for _ in range(FIT_REFINE):
            d, m, err = solve(x, wt, codes(x, best_d, best_m), best_d, best_m)
            better = (err < best_err) & ~flat
            best_d, best_m, best_err = (torch.where(better, a, b) for a, b in ((d, best_d), (m, best_m), (err, best_err)))
        dh, mh = best_d.float().half(), best_m.float().half()
        q = codes(x, dh.double(), mh.double()).to(torch.uint8)
        block = out[start:start + chunk]
        block[:, 0:2] = dh.view(torch.uint8)
        block[:, 2:4] = mh.view(torch.uint8)
        block[:, 4:] = q[:, :16] | (q[:, 16:] << 4)
    return out


def round_activation(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32, K a multiple of 32, rounded as the kernel rounds it before a product: per 32 values,
    codes = round-half-even(x · 32639 / max|x|) as int16, times max|x| / 32639 (a block with NaN/inf → NaN;
    32639 = 127 · 256 + 127, so a code splits into two signed bytes for the kernel's byte products).
    The torch fallback uses this, so fallback and kernel differ only in the order of fp32 additions."""
    blocks = x.float().reshape(*x.shape[:-1], -1, ACTIVATION_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    finite = torch.isfinite(blocks).all(dim=-1, keepdim=True)
    safe = torch.where((amax > 0) & finite, amax, torch.ones_like(amax))
    codes = torch.round(blocks * (torch.tensor(ACTIVATION_CODE_MAX) / safe)).clamp_(-ACTIVATION_CODE_MAX, ACTIVATION_CODE_MAX)
    out = codes * (safe / torch.tensor(ACTIVATION_CODE_MAX))
    out = torch.where(amax > 0, out, torch.zeros_like(out))
    out = torch.where(finite, out, torch.full_like(out, float("nan")))
    return out.reshape(x.shape)


# ---------------------------------------------------------------------------------------------- modules
class QuantizedLinear(nn.Module):
    """y = x · Wᵀ with W a QuantizedTensor; inference only (no gradient flows to W). Output in x's dtype."""

    def __init__(self, weight: QuantizedTensor):
        super().__init__()
        self.qweight = weight  # not a parameter or buffer: nothing to train, nothing in the state dict
        self.out_features, self.in_features = weight.shape
        lib = kernels.library()
        # the decode step's call, with its constant arguments bound once (a step makes 127 of them; on our
        # test machine the generic path's checks and reshapes cost more than a small matrix's product)
        self._kernel = None if lib is None or weight.padded_in != weight.shape[1] else (
            lib.gemma3_q_linear, weight.format.ggml_type, weight.data.data_ptr(), weight.data.shape[1],
            weight.shape[0], weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self._kernel is not None and x.dtype == torch.float32 and x.is_cpu and x.is_contiguous()
                and x.shape[-1] == self.in_features and x.numel() <= MAX_KERNEL_ROWS * self.in_features and x.numel()):
            fn, fmt, ptr, row_bytes, n, k = self._kernel
            y = torch.empty(x.shape[:-1] + (n,))
            if fn(fmt, ptr, row_bytes, n, k, x.data_ptr(), x.numel() // k, y.data_ptr()):
                raise Gemma3Error(f"{self.qweight}: kernel error")
            return y
        if x.device.type != "cpu":
            raise Gemma3Error(f"quantized {self.qweight.format.name} weights run on the CPU only, got input on "
                              f"{x.device}")
        y = self.qweight.matmul(x.reshape(-1, self.in_features).float())
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.qweight.format.name}, in_features={self.in_features}, out_features={self.out_features}"


class QuantizedEmbedding(nn.Module):
    """The tied embedding table in a block format: `forward` looks tokens up (dequantizing only those rows,
    in `dtype`), `attend` is the output head h · Eᵀ over the same blocks."""

    def __init__(self, weight: QuantizedTensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.qweight = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype
        self.head = QuantizedLinear(weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight.dequantize(ids.cpu())
        return rows.reshape(*ids.shape, self.embedding_dim).to(self.dtype)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)

    def cross_entropy(self, h: torch.Tensor, targets: torch.Tensor, softcap: float | None, chunk_size: int
                      ) -> torch.Tensor:
        """The head's summed cross-entropy, as every head offers it (model.TiedEmbedding.cross_entropy)."""
        return chunked_cross_entropy(self.attend, h, targets, softcap, chunk_size)

    def extra_repr(self) -> str:
        return f"{self.qweight.format.name}, {self.num_embeddings}, {self.embedding_dim}"


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())


def quantized_formats(model: nn.Module) -> dict[str, int]:
    """How many matrices the model holds in each block format (e.g. {'Q5_0': 73, 'Q8_0': 10, ...})."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)) and not (
                isinstance(m, QuantizedLinear) and any(m is e.head for e in model.modules()
                                                       if isinstance(e, QuantizedEmbedding))):
            counts[m.qweight.format.name] = counts.get(m.qweight.format.name, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------- swapping
def quantize_state(state: Mapping[str, torch.Tensor | QuantizedTensor], scheme: str,
                   importance: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor | QuantizedTensor]:
    """`state` with every projection and the embedding quantized to SCHEMES[scheme] (already quantized
    entries are kept); norms stay float. `importance`: {weight name: (in,) weights} for the Q4_1 fits
    (gemma3.accel.imatrix.collect), names it lacks fitted without."""
    if scheme not in SCHEMES:
        raise Gemma3Error(f"unknown quantization {scheme!r} (choose: none, {', '.join(SCHEMES)})")
    chosen = SCHEMES[scheme]
    n_layers = layer_count(state)

    def convert(name: str, t):
        if not QUANTIZABLE.match(name) or not isinstance(t, torch.Tensor):
            return t
        return QuantizedTensor.quantize(t, chosen.format_of(name, n_layers), (importance or {}).get(name))

    return {name: convert(name, t) for name, t in state.items()}


def layer_count(state: Mapping[str, object]) -> int:
    """How many decoder layers a state dict's names hold ('layers.17.…' → 18)."""
    found = [int(m.group(1)) for name in state if (m := LAYER_INDEX.match(name))]
    return max(found) + 1 if found else 0


def quantize_model(model: nn.Module, quantized: Mapping[str, QuantizedTensor], dtype: torch.dtype) -> nn.Module:
    """Swap the modules whose weights `quantized` holds (names as in the state dict, e.g.
    'layers.0.self_attn.q_proj.weight', 'embed_tokens.weight') for QuantizedLinear / QuantizedEmbedding.
    The model may live on the meta device (built before its weights are loaded)."""
    for name, qt in quantized.items():
        if not QUANTIZABLE.match(name):
            raise CheckpointError(f"{name}: only projections and the embedding can be quantized")
        path = name.rsplit(".", 1)[0]  # the module's name
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        expected = (old.num_embeddings, old.embedding_dim) if isinstance(old, nn.Embedding) else (
            old.out_features, old.in_features)
        if tuple(qt.shape) != tuple(expected):
            raise CheckpointError(f"{name}: quantized shape {qt.shape} does not match the model's {expected}")
        new = QuantizedEmbedding(qt, dtype) if isinstance(old, nn.Embedding) else QuantizedLinear(qt)
        setattr(parent, child, new)
    return model


def split_state(state: Mapping[str, torch.Tensor | QuantizedTensor]
                ) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
    """(the float tensors, the quantized ones) of a state dict that may hold both."""
    plain = {n: t for n, t in state.items() if not isinstance(t, QuantizedTensor)}
    return plain, {n: t for n, t in state.items() if isinstance(t, QuantizedTensor)}


def kernel_note() -> str | None:
    """A one-line notice when quantized products take the slow torch fallback, else None."""
    if kernels.library() is None:
        return (f"note: quantized weights without the native kernel ({kernels.status()}): the torch fallback "
                "computes the same products, several times slower")
    return None

