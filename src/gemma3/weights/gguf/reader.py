"""GGUF for Gemma 3: a bounded reader, dequantisers, the metadata -> config translation, and a writer.

Why our own reader instead of `gguf.GGUFReader`: a GGUF header is a sequence of attacker-chosen counts,
lengths, dims, type ids and offsets (docs/security.md lists the CVEs), and GGUFReader trusts them; it also
takes ~7 s and ~760 MB to expose the 262 144-entry tokenizer arrays. This reader checks every length
against fixed caps *and* against the bytes actually left in the file before it allocates anything, so a
43-byte file can never ask for gigabytes or loop for long: each step consumes at least one byte of input.
Numeric arrays come out as numpy arrays (one `frombuffer`, fast), string arrays as ``list[str]``.

Tensor data is memory-mapped copy-on-write (we never write to it; "copy-on-write" only makes the buffer
writable in numpy's eyes so torch can wrap it without a copy or a warning) and dequantised with
vectorised numpy: the whole 270M file in well under a second warm, against ~4 s for gguf-py's
`gguf.quants.dequantize`. The block layouts are ggml's (`ggml-quants.c`); tests check every supported type
against `gguf.quants.dequantize` on the real checkpoint.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma3.config import Gemma3Config, hybrid_layer_types
from gemma3.errors import CheckpointError, ConfigError
from gemma3.weights.names import GGUF_NAMES, OUR_TO_GGUF, check_tensors, is_norm, rename

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Caps, all far above any real Gemma 3 file (270M: 33 KVs, 236 tensors, 262 144-entry vocab arrays; 27B:
# 808 tensors) and far below what would hurt. Lengths are *also* checked against the bytes left in the file.
MAX_KV_COUNT = 1 << 16
MAX_TENSOR_COUNT = 1 << 16
MAX_STRING_BYTES = 1 << 24  # a chat template is a few KB; 16 MiB leaves room for anything legitimate
MAX_NAME_BYTES = 1 << 10  # keys and tensor names (ggml itself caps tensor names at 64 bytes)
MAX_ARRAY_LENGTH = 1 << 20  # vocab-sized at most
MAX_ARRAY_DEPTH = 2  # an array of arrays, no deeper
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 16

# Metadata value types (gguf spec): id -> (struct format, numpy dtype), both little-endian.
STRING, ARRAY = 8, 9
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
    5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "<u1"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
BOOL = 7


@dataclass(frozen=True)
class GGMLType:
    name: str
    block_elements: int  # values per block along the innermost dimension
    block_bytes: int


# Every ggml tensor type id we know the size of (ggml.h / gguf-py GGML_QUANT_SIZES); anything else is
# rejected while reading the index. Only some of them can be dequantised (see _DEQUANTISERS).
GGML_TYPES: dict[int, GGMLType] = {t_id: GGMLType(*spec) for t_id, spec in {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}.items()}
GGML_TYPE_IDS = {t.name: t_id for t_id, t in GGML_TYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (torch / numpy) order: ggml's ne reversed, so [out, in] for weights
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type].name

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Reads little-endian fields from a buffer, refusing to step past its end (= the file's end)."""

    def __init__(self, buf: memoryview, where: str):
        self.buf, self.pos, self.size, self.where = buf, 0, len(buf), where

    def error(self, problem: str) -> CheckpointError:
        # the problem may quote a key or tensor name read from the file: its control characters (a newline)
        # are written as escapes, so the error stays one line
        problem = re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], problem)
        return CheckpointError(f"{self.where}: {problem}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.error(f"file is truncated: {what} needs {n} bytes at offset {self.pos}, "
                             f"only {self.size - self.pos} left")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str, cap: int = MAX_STRING_BYTES) -> str:
        n = self.u64(f"length of {what}")
        if n > cap:
            raise self.error(f"{what} declares {n} bytes (limit {cap})")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not valid UTF-8") from None

    def value(self, type_id: int, what: str, depth: int = 0) -> Any:
        if type_id in _SCALARS:
            value = self.scalar(_SCALARS[type_id][0], what)
            return bool(value) if type_id == BOOL else value
        if type_id == STRING:
            return self.string(what)
        if type_id == ARRAY:
            return self.array(what, depth + 1)
        raise self.error(f"{what} has unknown value type id {type_id}")

    def array(self, what: str, depth: int) -> Any:
        if depth > MAX_ARRAY_DEPTH:
            raise self.error(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH} levels")
        item_type = self.u32(f"element type of {what}")
        count = self.u64(f"length of {what}")
        if count > MAX_ARRAY_LENGTH:
            raise self.error(f"{what} declares {count} elements (limit {MAX_ARRAY_LENGTH})")
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type][1])
            self.need(count * dtype.itemsize, f"{count} elements of {what}")
            out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += count * dtype.itemsize
            return out.astype(bool) if item_type == BOOL else out
        if item_type == STRING:
            # Each string carries at least its 8-byte length, so a count the file cannot hold fails here.
            self.need(count * 8, f"{count} strings of {what}")
            return self._strings(count, what)
        if item_type == ARRAY:
            self.need(count * 12, f"{count} nested arrays of {what}")  # each at least a type and a length
            return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]
        raise self.error(f"{what} has unknown element type id {item_type}")

    def _strings(self, count: int, what: str) -> list[str]:
        """The tokenizer's 262 144 pieces: the one hot loop of the reader, kept tight."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                if size - pos < 8:
                    break
                (n,) = unpack(buf, pos)
                pos += 8
                if n > MAX_STRING_BYTES or n > size - pos:
                    break
                append(str(buf[pos:pos + n], "utf-8"))
                pos += n
        except UnicodeDecodeError:
            raise self.error(f"{what}[{len(out)}] is not valid UTF-8") from None
        if len(out) < count:
            self.pos = pos
            raise self.error(f"file is truncated or corrupt inside {what}[{len(out)}]")
        self.pos = pos
        return out


class GGUFFile:
    """A validated GGUF file: `.metadata` (key -> value), `.tensors` (name -> TensorInfo), mmapped data.

    Opening reads and checks the header only; tensor bytes are touched when a tensor is dequantised.
    """

    def __init__(self, path: Path, version: int, metadata: dict[str, Any], tensors: dict[str, TensorInfo],
                 data: np.ndarray | None):
        self.path, self.version, self.metadata, self.tensors, self._data = path, version, metadata, tensors, data

    @classmethod
    def open(cls, path: str | os.PathLike) -> "GGUFFile":
        path = Path(path)
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise CheckpointError(f"{path}: not a regular file")
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open GGUF file: {e.strerror}") from None
        if size < 24:
            raise CheckpointError(f"{path}: file is truncated: {size} bytes is too short for a GGUF header")
        try:
            with open(path, "rb") as f:  # copy-on-write: torch wants writable arrays; nothing writes the file
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot map GGUF file: {e}") from None
        data = np.frombuffer(mapping, dtype=np.uint8)
        version, metadata, tensors = _parse(memoryview(data), str(path))
        _drop_header_pages(mapping, min((t.offset for t in tensors.values()), default=0))
        return cls(path, version, metadata, tensors, data)

    # ---------------------------------------------------------------- tensor data
    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a uint8 view of the mapping (no copy)."""
        info = self.tensors[name]
        return self._data[info.offset:info.offset + info.nbytes]

    def dequantize(self, name: str) -> torch.Tensor:
        """The tensor as float32 (F32 data is a view of the mapping, everything else a fresh tensor)."""
        info = self.tensors[name]
        kind = GGML_TYPES[info.ggml_type]
        fn = _DEQUANTISERS.get(kind.name)
        if fn is None:  # the other block types: gguf-py's reference dequantisers (slower, numpy)
            import gguf as gguf_py

            qtype = getattr(gguf_py.GGMLQuantizationType, kind.name, None)
            try:
                values = gguf_py.quants.dequantize(np.asarray(self.raw(name)).reshape(info.shape[0], -1), qtype)
            except (NotImplementedError, TypeError, ValueError, KeyError):
                raise CheckpointError(f"{self.path}: tensor {name} has type {kind.name}, which gemma3 cannot "
                                      f"dequantise") from None
            return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(info.shape))
        blocks = self.raw(name).reshape(-1, kind.block_bytes)
        return torch.from_numpy(fn(blocks).reshape(info.shape))

    def quantized(self, name: str):
        """The tensor's blocks as they are in the file (a gemma3.accel.quantize.QuantizedTensor, no copy), or None
        when its type has no native kernel."""
        from gemma3.accel.quantize import FORMATS, QuantizedTensor

        info = self.tensors[name]
        if info.type_name not in FORMATS or len(info.shape) != 2:
            return None
        return QuantizedTensor(info.type_name, torch.from_numpy(self.raw(name)), info.shape)


def _drop_header_pages(mapping: mmap.mmap, end: int) -> None:
    """Take the header's pages (bytes [0, end), whole pages only) out of this process's memory: the parser read
    them through the map and copied what it keeps (for Gemma 3, 6 MB: the tokenizer's 262 144 pieces, scores
    and types), and mapped pages stay resident (counted in RSS) until the mapping goes. Done before anything
    else touches the map, so no page written since is dropped (on copy-on-write pages that would lose the
    writes). llama.cpp reads its header with fread instead, which never maps it."""
    length = end // mmap.PAGESIZE * mmap.PAGESIZE
    if length and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapping.madvise(mmap.MADV_DONTNEED, 0, length)
        except OSError:  # only memory: the pages stay
            pass


def _parse(buf: memoryview, where: str) -> tuple[int, dict[str, Any], dict[str, TensorInfo]]:
    """Parse and check a whole GGUF header (everything before the tensor data)."""
    cur = _Cursor(buf, where)
    cur.need(4, "magic")
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise cur.error(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.u32("version")
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in (2, 3):
            raise cur.error("big-endian GGUF files are not supported")
        raise cur.error(f"unsupported GGUF version {version} (expected 2 or 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    if n_tensors > MAX_TENSOR_COUNT:
        raise cur.error(f"header declares {n_tensors} tensors (limit {MAX_TENSOR_COUNT})")
    if n_kv > MAX_KV_COUNT:
        raise cur.error(f"header declares {n_kv} metadata entries (limit {MAX_KV_COUNT})")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", MAX_NAME_BYTES)
        if key in metadata:
            raise cur.error(f"duplicate metadata key {key!r}")
        metadata[key] = cur.value(cur.u32(f"type of {key}"), key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
            or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT):
        raise cur.error(f"general.alignment is {alignment!r}; expected a power of two up to {MAX_ALIGNMENT}")

    pending: list[tuple[str, tuple[int, ...], int, int, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}", MAX_NAME_BYTES)
        if name in seen:
            raise cur.error(f"duplicate tensor name {name!r}")
        seen.add(name)
        n_dims = cur.u32(f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.error(f"tensor {name} has {n_dims} dimensions (expected 1 to {MAX_DIMS})")
        ne = [cur.u64(f"dimension {d} of {name}") for d in range(n_dims)]
        type_id = cur.u32(f"type of {name}")
        rel_offset = cur.u64(f"offset of {name}")
        if any(n == 0 for n in ne):
            raise cur.error(f"tensor {name} has a zero dimension {ne}")
        kind = GGML_TYPES.get(type_id)
        if kind is None:
            raise cur.error(f"tensor {name} has unknown type id {type_id}")
        if ne[0] % kind.block_elements:
            raise cur.error(f"tensor {name}: row length {ne[0]} is not a multiple of the "
                            f"{kind.name} block size {kind.block_elements}")
        if rel_offset % alignment:
            raise cur.error(f"tensor {name}: offset {rel_offset} is not a multiple of the alignment {alignment}")
        nbytes = math.prod(ne) // kind.block_elements * kind.block_bytes  # Python ints: no overflow
        pending.append((name, tuple(reversed(ne)), type_id, rel_offset, nbytes))

    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, type_id, rel_offset, nbytes in pending:
        offset = data_start + rel_offset
        if offset + nbytes > cur.size:
            raise cur.error(f"tensor {name} ({nbytes} bytes at offset {offset}) extends past the end of the "
                            f"file ({cur.size} bytes)")
        tensors[name] = TensorInfo(name, shape, type_id, offset, nbytes)
    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.offset + a.nbytes > b.offset:
            raise cur.error(f"tensors {a.name} and {b.name} overlap")
    return version, metadata, tensors


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Only the metadata of a GGUF file (string arrays as list[str], numeric arrays as numpy arrays)."""
    return GGUFFile.open(path).metadata


# ---------------------------------------------------------------------- dequantisation (ggml block layouts)
# numpy rather than torch: torch's uint8 bit operations on CPU were ~20x slower on these small, strided
# block views (measured: Q5_0 ffn_gate 90 ms vs 4 ms). Each function maps [blocks, block_bytes] uint8 to
# [blocks, block_elements] float32.
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


def _dq_q5_0(b: np.ndarray) -> np.ndarray:
    # block: f16 scale, 32 high bits (u32), 16 bytes of nibbles. Value j's low nibble is qs[j] & 15 for
    # j < 16 and qs[j - 16] >> 4 after; its fifth bit is bit j of the u32. Values are offset by 16.
    high = ((np.ascontiguousarray(b[:, 2:6]).view("<u4") >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    qs = b[:, 6:22]
    out = (np.concatenate([qs & 15, qs >> 4], axis=1) | (high << 4)).astype(np.float32)
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


_DEQUANTISERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": _dq_f32, "F16": _dq_f16, "BF16": _dq_bf16, "Q8_0": _dq_q8_0, "Q5_0": _dq_q5_0,
    "Q4_K": _dq_q4_k, "Q6_K": _dq_q6_k,
}


# ---------------------------------------------------------------------- metadata -> config
ARCH = "gemma3"
END_OF_TURN = "<end_of_turn>"


def config_from_gguf(gguf: GGUFFile) -> Gemma3Config:
    """Translate GGUF metadata into a Gemma3Config, supplying what llama.cpp hard-codes (spec section 8)."""
    meta, where = gguf.metadata, str(gguf.path)
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{where}: general.architecture is {arch!r}, not {ARCH!r} (a Gemma 3 text model)")

    def number(key: str, default: Any = None, kind: type = int) -> Any:
        value = meta.get(f"{ARCH}.{key}", default)
        if value is None:
            raise CheckpointError(f"{where}: metadata key {ARCH}.{key} is missing")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            ok = ok and isinstance(value, int)
        if not ok or not value > 0:
            raise CheckpointError(f"{where}: metadata key {ARCH}.{key} must be a positive {kind.__name__}, "
                                  f"got {value!r}")
        return value

    d = number("embedding_length")
    n_layers = number("block_count")
    n_heads = number("attention.head_count")
    head_dim = number("attention.key_length", d // n_heads)
    if number("attention.value_length", head_dim) != head_dim:
        raise CheckpointError(f"{where}: attention.value_length differs from key_length; not a Gemma 3 model")
    # llama.cpp: the 27B (62 layers) scales queries by d/H (= 168), every other size by head_dim.
    qpas = d // n_heads if n_layers == 62 else head_dim

    factor = 1.0
    scaling_type = meta.get(f"{ARCH}.rope.scaling.type", "linear")
    if f"{ARCH}.rope.scaling.factor" in meta and scaling_type not in ("none",):
        if scaling_type != "linear":
            raise CheckpointError(f"{where}: rope scaling type {scaling_type!r} is not supported (Gemma 3 uses linear)")
        factor = float(number("rope.scaling.factor", kind=float))

    embd = gguf.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise CheckpointError(f"{where}: missing tensor token_embd.weight")
    if "output.weight" in gguf.tensors:
        raise CheckpointError(f"{where}: has an untied output.weight; Gemma 3 ties its output head to "
                              f"token_embd.weight")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and (not isinstance(tokens, list) or len(tokens) > embd.shape[0]):
        raise CheckpointError(f"{where}: tokenizer.ggml.tokens lists more tokens than token_embd.weight has rows")

    def token_id(key: str, default: int) -> int:
        value = meta.get(f"tokenizer.ggml.{key}", default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise CheckpointError(f"{where}: tokenizer.ggml.{key} must be an integer, got {value!r}")
        return value

    eos = [token_id("eos_token_id", 1)]
    # <end_of_turn> ends chat turns but the GGUF records only <eos>; llama.cpp finds it by its text too.
    if tokens is not None and END_OF_TURN in tokens[:1024]:
        eos.append(tokens.index(END_OF_TURN))
    softcap = meta.get(f"{ARCH}.final_logit_softcapping")
    try:
        return Gemma3Config(
            vocab_size=embd.shape[0],  # rows of the weight, not the tokenizer (spec pitfall 21)
            hidden_size=d,
            intermediate_size=number("feed_forward_length"),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=number("attention.head_count_kv", n_heads),
            head_dim=head_dim,
            query_pre_attn_scalar=qpas,
            sliding_window=number("attention.sliding_window"),
            layer_types=hybrid_layer_types(n_layers),  # pattern 6, hard-coded as in llama.cpp
            rope_theta=float(number("rope.freq_base", 1_000_000.0, float)),
            rope_local_base_freq=10_000.0,  # not in GGUF; llama.cpp hard-codes it for sliding layers
            rope_scaling_factor=factor,
            max_position_embeddings=number("context_length"),
            rms_norm_eps=float(number("attention.layer_norm_rms_epsilon", 1e-6, float)),
            final_logit_softcapping=float(softcap) if softcap is not None else None,
            pad_token_id=token_id("padding_token_id", 0),
            eos_token_id=tuple(dict.fromkeys(eos)),
            bos_token_id=token_id("bos_token_id", 2),
        )
    except ConfigError as e:
        raise CheckpointError(f"{where}: metadata describes an invalid model: {e}") from None


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              progress: Callable[[Iterable[str]], Iterable[str]] | None = None, keep_quantized: bool = False,
              notice: Callable[[str], None] | None = None) -> tuple[Gemma3Config, dict[str, torch.Tensor], GGUFFile]:
    """Read a Gemma 3 GGUF into (config, our state dict in `dtype`, the open file).

    Names and shapes are checked against the config before any tensor is dequantised. `keep_quantized`:
    projections and the embedding stored in a block format with a native kernel (gemma3.accel.quantize.FORMATS)
    stay in it, as QuantizedTensors over the file's mapping; a matrix in another block type is dequantised,
    and `notice` is told so in one line.
    """
    from gemma3.accel.quantize import QUANTIZABLE

    gguf = GGUFFile.open(path)
    config = config_from_gguf(gguf)
    ours: dict[str, str] = {}
    for name in gguf.tensors:
        target = rename(name, GGUF_NAMES)
        if target is None:
            raise CheckpointError(f"{gguf.path}: unexpected tensor {name}")
        ours[target] = name
    check_tensors({o: gguf.tensors[g].shape for o, g in ours.items()}, config, str(gguf.path),
                  display=lambda n: ours.get(n) or rename(n, OUR_TO_GGUF) or n)
    state: dict[str, torch.Tensor] = {}
    names: Iterable[str] = ours
    if progress is not None:
        names = progress(names)
    slow: dict[str, int] = {}
    for name in names:
        info = gguf.tensors[ours[name]]
        if keep_quantized and QUANTIZABLE.match(name) and info.type_name not in ("F32", "F16", "BF16"):
            blocks = gguf.quantized(ours[name])
            if blocks is not None:
                state[name] = blocks
                continue
            slow[info.type_name] = slow.get(info.type_name, 0) + 1
        tensor = gguf.dequantize(ours[name])
        if is_norm(name):
            tensor = tensor - 1.0  # GGUF stores 1 + w; our RMSNorm computes x̂ · (1 + w)
        state[name] = tensor.to(dtype)
    if slow and notice is not None:
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(slow.items()))
        notice(f"note: {gguf.path.name}: no native kernel for {kinds} tensor(s); those are dequantised to {dtype} "
               "and run as float weights")
    return config, state, gguf


# ---------------------------------------------------------------------- writer
# Q8_0 / Q5_0 / Q4_1 / Q4_0 are quantized by gguf-py (llama.cpp's reference quantizers); Q4_K, which gguf-py
# cannot write, by weights/gguf/q4_k.py. A matrix whose rows are not a multiple of Q4_K's 256 values is written Q5_0
# instead (llama.cpp's own fallback for Q4_K): for the 270M (hidden size 640) that is q, k, v, gate and up; o and
# down are Q4_K. The tied embedding, which is also the output head, is Q8_0 (llama.cpp gives the output Q6_K, or
# Q8_0 where its rows do not fit Q6_K's 256; we have no Q6_K quantizer).
WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_1", "Q4_0", "Q4_K")
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q4_K": 14, "BF16": 32}  # LLAMA_FTYPE_*
Q4_K_FALLBACK = "Q5_0"


def _block_type(tensor_type: str, gguf_name: str, cols: int) -> str:
    """The type one matrix is written in: `tensor_type`, but under Q4_K the embedding Q8_0 and rows that do not
    fill Q4_K's super-blocks Q4_K_FALLBACK (above)."""
    from gemma3.weights.gguf.q4_k import QK_K

    if tensor_type != "Q4_K":
        return tensor_type
    if gguf_name == "token_embd.weight":
        return "Q8_0"
    return "Q4_K" if cols % QK_K == 0 else Q4_K_FALLBACK


def write_gguf(path: str | os.PathLike, config: Gemma3Config, state: Mapping[str, torch.Tensor],
               tokenizer_metadata: Mapping[str, Any], tensor_type: str = "BF16", name: str = "Gemma 3",
               progress: Callable[[Iterable[str]], Iterable[str]] | None = None) -> Path:
    """Write a llama.cpp-loadable gemma3 GGUF (atomically: a temporary file renamed into place).

    `tokenizer_metadata` holds the `tokenizer.ggml.*` keys (and optionally `tokenizer.chat_template`),
    e.g. copied from a source GGUF or built by `tokenizer_metadata_from_json`. Norms are always F32 (as
    llama.cpp's converter does), stored as 1 + w; the other matrices use `tensor_type`.
    """
    import gguf as gguf_py  # the writer and quantisers of the reference implementation

    from gemma3.weights.gguf.q4_k import quantize_q4_k

    if tensor_type not in WRITABLE_TYPES:
        raise CheckpointError(f"cannot write GGUF tensor type {tensor_type!r}; choose one of {', '.join(WRITABLE_TYPES)}")
    if config.layer_types != hybrid_layer_types(config.num_hidden_layers):
        raise CheckpointError("GGUF cannot record a layer pattern other than Gemma 3's 5 local : 1 global")
    expected_qpas = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62 \
        else config.head_dim
    if config.query_pre_attn_scalar != expected_qpas or config.rope_local_base_freq != 10_000.0:
        raise CheckpointError("GGUF cannot record this config's query_pre_attn_scalar / local RoPE base; "
                              "llama.cpp would run it wrongly")
    path = Path(path)
    writer_path = path.with_name(path.name + ".tmp")
    w = gguf_py.GGUFWriter(writer_path, ARCH)
    w.add_name(name)
    w.add_file_type(_FILE_TYPES[tensor_type])
    w.add_quantization_version(gguf_py.GGML_QUANT_VERSION)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_sliding_window(config.sliding_window)
    if config.rope_scaling_factor != 1.0:
        w.add_rope_scaling_type(gguf_py.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scaling_factor)
    if config.final_logit_softcapping is not None:
        w.add_final_logit_softcapping(config.final_logit_softcapping)
    for key, value in tokenizer_metadata.items():
        if key == "tokenizer.ggml.tokens":
            w.add_token_list(list(value))
        elif key == "tokenizer.ggml.scores":
            w.add_token_scores(np.asarray(value, dtype=np.float32).tolist())
        elif key == "tokenizer.ggml.token_type":
            w.add_token_types(np.asarray(value, dtype=np.int32).tolist())
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            raise CheckpointError(f"cannot write tokenizer metadata {key!r} of type {type(value).__name__}")

    names: Iterable[str] = list(state)
    if progress is not None:
        names = progress(names)
    for our_name in names:
        gguf_name = rename(our_name, OUR_TO_GGUF)
        if gguf_name is None:
            raise CheckpointError(f"cannot export tensor {our_name}: it has no GGUF name")
        tensor = state[our_name].detach().float()
        if is_norm(our_name):
            w.add_tensor(gguf_name, (tensor + 1.0).numpy())
            continue
        array = tensor.numpy()
        if tensor_type == "F32":
            w.add_tensor(gguf_name, array)
        elif tensor_type == "F16":
            w.add_tensor(gguf_name, array.astype(np.float16))
        else:
            kind = _block_type(tensor_type, gguf_name, array.shape[-1])
            qtype = gguf_py.GGMLQuantizationType[kind]
            block = gguf_py.GGML_QUANT_SIZES[qtype][0]
            if array.shape[-1] % block:
                raise CheckpointError(f"cannot write {gguf_name} {tuple(array.shape)} as {tensor_type}: its rows of "
                                      f"{array.shape[-1]} are not a multiple of the {block}-element block")
            data = quantize_q4_k(tensor) if kind == "Q4_K" else gguf_py.quants.quantize(array, qtype)
            w.add_tensor(gguf_name, data, raw_dtype=qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(writer_path, path)
    finally:
        if writer_path.exists():
            writer_path.unlink()
    return path


# Token types of llama.cpp's vocabulary (gguf-py TokenType).
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6
# Gemma 3's SentencePiece CONTROL pieces; every other added token is USER_DEFINED (whitespace runs, HTML
# tags, <start_of_image> ...). tokenizer.json does not record this, so it is spelled out here.
_CONTROL_PIECES = frozenset({"<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"})


def tokenizer_metadata_from_json(tokenizer_json: str | os.PathLike) -> dict[str, Any]:
    """Rebuild the `tokenizer.ggml.*` keys from a Gemma 3 tokenizer.json, as llama.cpp's converter lays them out.

    Checked against the embedded GGUF: identical tokens and types (llama.cpp spells whitespace pieces with
    real spaces). Scores: BYTE 0, CONTROL / USER_DEFINED -1000 as llama.cpp writes them; the original
    SentencePiece scores of NORMAL pieces are not in tokenizer.json, so they get -(rank among NORMAL
    pieces), which orders them exactly as the originals do, and order is all that merge ranking uses.
    """
    import json

    path = Path(tokenizer_json)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab: dict[str, int] = data["model"]["vocab"]
        added = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot read tokenizer vocabulary: {e}") from None
    size = len(vocab)
    if sorted(vocab.values()) != list(range(size)):
        raise CheckpointError(f"{path}: vocabulary ids are not 0..{size - 1}")
    tokens = [""] * size
    for piece, index in vocab.items():
        tokens[index] = piece
    types = np.full(size, NORMAL, dtype=np.int32)
    for index, piece in enumerate(tokens):
        if index in added:
            is_control = piece in _CONTROL_PIECES or (piece.startswith("<unused") and piece.endswith(">"))
            types[index] = CONTROL if is_control else USER_DEFINED
            if not is_control:
                tokens[index] = piece.replace("▁", " ")
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types[index] = BYTE
    normal = types == NORMAL
    scores = np.where(normal, -(np.cumsum(normal) - 1), np.where(types == BYTE, 0, -1000)).astype(np.float32)
    ids = {piece: index for index, piece in added.items()}
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": ids.get("<bos>", 2),
        "tokenizer.ggml.eos_token_id": ids.get("<eos>", 1),
        "tokenizer.ggml.unknown_token_id": ids.get("<unk>", 3),
        "tokenizer.ggml.padding_token_id": ids.get("<pad>", 0),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
    }
