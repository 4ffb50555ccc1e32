"""Gemma 3's tokenizer run by our own BPE engine (`kernels/bpe.c`), with the same ids as HF `tokenizers`.

Why not just `tokenizers`: it holds the 262 144-piece vocabulary, its 514 906 merges and the 6 415 added
tokens in Rust maps, and building them from a GGUF's vocabulary takes a while (plus deriving the merges in
Python, which is why a cache exists for it): a large share of the memory and the load time of running the
embedded 270M. This engine keeps the vocabulary as one byte string with offsets and builds its tables in C, a
fraction of the memory and the time, merges derived on the spot, no cache (docs/tokenizer.md has the figures).

It implements exactly the official `tokenizer.json` pipeline (bpe.c's header walks through it): added tokens
matched leftmost-longest in the raw text, `" "` -> `"▁"`, BPE over each stretch between them, merges applied
lowest rank first, byte fallback. `tests/test_tokenizer.py` holds it to the official file on a corpus of
hard cases and on random text. Decoding is Python here, HF's decoder chain rule for rule.

`gemma3.text.tokenizer.Tokenizer` picks this engine whenever the kernels build, HF `tokenizers` otherwise (or
for an HF tokenizer.json, which it loads as is). `to_json()` builds the HF form when something needs the
file itself (`Tokenizer.save`, llguidance).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from gemma3.errors import CheckpointError, Gemma3Error
from gemma3.text.vocab import (SPECIAL_TOKENS, utf8_of, added_ids, byte_value, checked_arrays, extra_tokens, rank_merges,
                               ranking_scores, require_pieces)

i64, ptr = ctypes.c_int64, ctypes.c_void_p


def library() -> ctypes.CDLL | None:
    """The compiled bpe.c (None where the kernels do not build: `gemma3.kernels.bpe_status()` says why)."""
    from gemma3.kernels import bpe_library

    lib = bpe_library()[0]
    if lib is not None and not getattr(lib, "_gemma3_typed", False):
        lib.gemma3_bpe_new.argtypes = [i64, ptr, ptr, ctypes.c_int32, ctypes.POINTER(i64)]
        lib.gemma3_bpe_new.restype = ptr
        lib.gemma3_bpe_free.argtypes = [ptr]
        lib.gemma3_bpe_free.restype = None
        lib.gemma3_bpe_add_token.argtypes = [ptr, ctypes.c_char_p, i64, ctypes.c_int32]
        lib.gemma3_bpe_add_token.restype = ctypes.c_int
        lib.gemma3_bpe_token_to_id.argtypes = [ptr, ctypes.c_char_p, i64]
        lib.gemma3_bpe_token_to_id.restype = i64
        lib.gemma3_bpe_splits.argtypes = [ptr, i64, ptr, ptr, ptr, ptr]
        lib.gemma3_bpe_splits.restype = i64
        lib.gemma3_bpe_set_merges.argtypes = [ptr, i64, ptr, ptr, ptr]
        lib.gemma3_bpe_set_merges.restype = ctypes.c_int
        lib.gemma3_bpe_encode.argtypes = [ptr, ptr, i64, ptr, i64]
        lib.gemma3_bpe_encode.restype = i64
        lib._gemma3_typed = True
    return lib


def from_vocab(pieces: Sequence[str], scores: Any, types: Any, source: str, lib: ctypes.CDLL) -> NativeBPE:
    """The engine for SentencePiece-style vocab arrays, checked (duplicate pieces are found while hashing them)."""
    scores, types = checked_arrays(pieces, scores, types, source)
    require_pieces(pieces, source)
    return NativeBPE(pieces, scores, types, added_ids(types), extra_tokens(pieces, len(pieces)), SPECIAL_TOKENS,
                     source, lib)


class NativeBPE:
    """The engine behind `Tokenizer` for SentencePiece-style vocabularies (GGUF, tokenizer.model).

    `pieces` are spelled as in tokenizer.json (`▁` for spaces); `added` lists the ids matched whole in raw
    text, `extra` the added tokens past the pieces (content, id), `special` the added contents that
    `decode(skip_special_tokens=True)` drops. The merges are derived here: bpe.c finds the splits,
    `vocab.rank_merges` ranks them, as for the HF engine."""

    name = "native"

    def __init__(self, pieces: Sequence[str], scores: np.ndarray, types: np.ndarray, added: np.ndarray,
                 extra: Sequence[tuple[str, int]], special: frozenset[str], source: str, lib: ctypes.CDLL):
        self._lib = lib
        self.source = source
        self.n_pieces = len(pieces)
        # one string, encoded once; each piece's byte offset is where its first character starts
        try:
            self._blob = "".join(pieces).encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointError(f"{source}: a tokenizer piece is not valid Unicode") from None
        starts = np.flatnonzero((np.frombuffer(self._blob, dtype=np.uint8) & 0xC0) != 0x80)
        chars = np.zeros(self.n_pieces + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=self.n_pieces), out=chars[1:])
        self._offsets = np.append(starts, len(self._blob))[chars]
        self._chars = np.diff(chars).astype(np.int32)  # each piece's length in characters
        del starts, chars
        # GGUF and tokenizer.model store the scores as float32: kept so when that is exact (1 MB less for Gemma 3)
        narrow = scores.astype(np.float32)
        self._scores = narrow if np.array_equal(narrow, scores) else scores
        self._types = types.astype(np.int8)
        self._handle = None
        duplicate = i64(-1)
        unk = self._find(pieces, "<unk>")
        handle = lib.gemma3_bpe_new(self.n_pieces, self._blob, self._offsets.ctypes.data, unk, ctypes.byref(duplicate))
        if not handle:
            if duplicate.value >= 0:
                raise CheckpointError(f"{source}: the tokenizer vocabulary has duplicate pieces "
                                      f"({pieces[duplicate.value]!r}, id {duplicate.value})")
            raise MemoryError("out of memory building the tokenizer")
        self._handle = handle
        self._extra = dict(extra)
        for index in added.tolist():
            self._add(self._piece_bytes(index), index)
        for content, index in self._extra.items():
            self._add(content.encode("utf-8"), index)
        self.vocab_size = self.n_pieces + len(self._extra)
        self._byte_ids: dict[int, int] = {}
        blob = np.frombuffer(self._blob, dtype=np.uint8)
        six = np.flatnonzero(np.diff(self._offsets) == 6)
        six = six[(blob[self._offsets[six]] == ord("<")) & (blob[self._offsets[six] + 2] == ord("x"))]
        for index in six.tolist():
            value = byte_value(self._piece_bytes(index))
            if value is not None:
                self._byte_ids[index] = value
        added_set = set(added.tolist())
        self.special_ids = frozenset([i for i in added_set if self.id_to_token(i) in special]
                                     + [i for c, i in self._extra.items() if c in special])
        self._set_merges()

    @staticmethod
    def _find(pieces: Sequence[str], piece: str) -> int:
        try:
            return pieces.index(piece)
        except ValueError:
            return -1

    def _add(self, content: bytes, index: int) -> None:
        if self._lib.gemma3_bpe_add_token(self._handle, content, len(content), index):
            raise MemoryError("out of memory building the tokenizer")

    def __del__(self):
        if getattr(self, "_handle", None):
            self._lib.gemma3_bpe_free(self._handle)
            self._handle = None

    # ------------------------------------------------------------------------------------------ merges
    def splits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every split of a piece into two pieces: (left ids, right ids, owner ids, left lengths in chars)."""
        room = 3 * self.n_pieces + 16  # Gemma 3: 514 906 splits of 262 144 pieces; else a second call
        while True:
            arrays = [np.empty(room, dtype=np.int32) for _ in range(4)]
            count = self._lib.gemma3_bpe_splits(self._handle, room, *(a.ctypes.data for a in arrays))
            if count <= room:
                return tuple(a[:count] for a in arrays)
            room = count

    def _ranked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(left, right, merged piece) ids of the merges, in rank order."""
        left, right, owner, left_chars = self.splits()
        order = rank_merges(owner, left_chars, self._chars, ranking_scores(self._scores, self._types))
        return tuple(np.ascontiguousarray(a[order]) for a in (left, right, owner))

    def merges(self) -> np.ndarray:
        """The merges in rank order, as (M, 2) int32 ids of their left and right pieces (what
        `hf_engine._bpe_merges` derives in Python, in a fraction of its time)."""
        left, right, _ = self._ranked()
        return np.stack([left, right], axis=1)

    def _set_merges(self) -> None:
        left, right, owner = self._ranked()
        if self._lib.gemma3_bpe_set_merges(self._handle, len(left), left.ctypes.data, right.ctypes.data,
                                           owner.ctypes.data):
            raise MemoryError("out of memory building the tokenizer")

    # ----------------------------------------------------------------------------------- text <-> ids
    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes str, not {type(text).__name__}")
        data = utf8_of(text)
        for room in (len(data) + 1, 3 * len(data) + 1):  # the second always suffices (bpe.c)
            out = np.empty(room, dtype=np.int32)
            count = self._lib.gemma3_bpe_encode(self._handle, data, len(data), out.ctypes.data, room)
            if count == -1:
                raise MemoryError(f"out of memory tokenizing {len(data)} bytes")
            if count >= 0:
                return out[:count].tolist()
        raise AssertionError("bpe.c wanted more than 3 ids per byte")

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """HF's decoder chain: `▁` -> space on each token, runs of byte tokens joined into UTF-8 (U+FFFD per
        byte when a run is not valid UTF-8), everything concatenated."""
        out: list[str] = []
        pending = bytearray()
        for index in ids:
            if skip_special_tokens and index in self.special_ids:
                continue
            value = self._byte_ids.get(index)
            if value is not None:
                pending.append(value)
                continue
            if pending:
                out.append(_decode_byte_run(pending))
                pending.clear()
            out.append(self.id_to_token(index).replace("▁", " "))
        if pending:
            out.append(_decode_byte_run(pending))
        return "".join(out)

    # --------------------------------------------------------------------------------- pieces <-> ids
    def _piece_bytes(self, index: int) -> bytes:
        return self._blob[self._offsets[index]:self._offsets[index + 1]]

    def id_to_token(self, index: int) -> str:
        if index < self.n_pieces:
            return self._piece_bytes(index).decode("utf-8")
        for content, i in self._extra.items():
            if i == index:
                return content
        raise IndexError(index)

    def token_to_id(self, piece: str) -> int | None:
        if piece in self._extra:
            return self._extra[piece]
        data = piece.encode("utf-8", "surrogatepass")
        index = self._lib.gemma3_bpe_token_to_id(self._handle, data, len(data))
        return None if index < 0 else index

    def pieces(self) -> list[str]:
        return [self._piece_bytes(i).decode("utf-8") for i in range(self.n_pieces)]

    def to_json(self) -> str:
        """The official tokenizer.json for this vocabulary, through HF `tokenizers` (built here, not kept)."""
        from gemma3.text.hf_engine import assemble

        pieces = self.pieces()
        vocab = {piece: index for index, piece in enumerate(pieces)}
        return assemble(pieces, vocab, self._types.astype(np.int64), self.merges()).to_str(pretty=True)


def _decode_byte_run(data: bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(data)
