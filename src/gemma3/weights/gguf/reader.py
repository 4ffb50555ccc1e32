"""The GGUF reader: a bounded parser of the header, the ggml type table, and tensors read from a memory map.

Why our own reader instead of `gguf.GGUFReader`: a GGUF header is a sequence of attacker-chosen counts,
lengths, dims, type ids and offsets (docs/security.md lists the CVEs), and GGUFReader trusts them; it is also
slow and memory-hungry on the 262 144-entry tokenizer arrays (docs/models-and-conversion.md has the figures).
This reader checks every length against fixed caps *and* against the bytes actually left in the file before it
allocates anything, so a 43-byte file can never ask for gigabytes or loop for long: each step consumes at
least one byte of input. Numeric arrays come out as numpy arrays (one `frombuffer`, fast), string arrays as
``list[str]``.

Tensor data is memory-mapped copy-on-write (we never write to it; "copy-on-write" only makes the buffer
writable in numpy's eyes so torch can wrap it without a copy or a warning). `GGUFFile.dequantize` gives a
tensor as float32 (gemma3.weights.gguf.dequantize); `GGUFFile.blocks` gives a matrix as it is in the file.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma3.errors import CheckpointError
from gemma3.weights.gguf.dequantize import dequantize_blocks

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
# rejected while reading the index. Not all of them can be dequantised (gemma3.weights.gguf.dequantize).
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
        _drop_parsed_pages(mapping)
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
        values = dequantize_blocks(kind.name, self.raw(name).reshape(-1, kind.block_bytes))
        if values is None:  # the other block types: gguf-py's reference dequantisers (slower, numpy)
            import gguf as gguf_py

            qtype = getattr(gguf_py.GGMLQuantizationType, kind.name, None)
            try:
                values = gguf_py.quants.dequantize(np.asarray(self.raw(name)).reshape(info.shape[0], -1), qtype)
            except (NotImplementedError, TypeError, ValueError, KeyError):
                raise CheckpointError(f"{self.path}: tensor {name} has type {kind.name}, which gemma3 cannot "
                                      f"dequantise") from None
            return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(info.shape))
        return torch.from_numpy(values.reshape(info.shape))

    def blocks(self, name: str) -> BlockTensor:
        """The matrix as it is in the file: its blocks over the mapping, no copy."""
        info = self.tensors[name]
        if len(info.shape) != 2:
            raise CheckpointError(f"{self.path}: tensor {name} has shape {list(info.shape)}, not a matrix")
        return BlockTensor(info.type_name, torch.from_numpy(self.raw(name)), info.shape)


@dataclass(frozen=True)
class BlockTensor:
    """An (out, in) matrix kept in its file's ggml blocks: `data` is its bytes, uint8 over the file's mapping
    (no copy), `type_name` its ggml type (GGML_TYPES). The weights side only hands these on: gemma3.loading
    turns them into gemma3.accel.quantize.QuantizedTensors."""
    type_name: str
    data: torch.Tensor
    shape: tuple[int, int]


def _drop_parsed_pages(mapping: mmap.mmap) -> None:
    """Take the pages the parser mapped out of this process's memory: it read the header through the map and
    copied what it keeps (for Gemma 3, the tokenizer's 262 144 pieces, scores and types), and mapped pages stay
    resident (counted in RSS) until the mapping goes. The whole map, not the header alone: a fault near the
    header's end also maps pages past it (fault-around, large folios), and none of them is needed yet. Done
    before anything else touches the map, so no page has been written (on copy-on-write pages that would lose
    the writes); tensor pages fault back in from the page cache when read. llama.cpp reads its header with
    fread instead, which never maps it."""
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapping.madvise(mmap.MADV_DONTNEED, 0, len(mapping))
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
