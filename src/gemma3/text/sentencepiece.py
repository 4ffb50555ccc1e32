"""SentencePiece's `tokenizer.model` read without `sentencepiece` or `protobuf`: a small protobuf parser that
reads only the pieces (text, score, type) and the model type, and checks every length against the buffer, so a
corrupt or hostile file ends in a one-line CheckpointError."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from gemma3.errors import CheckpointError
from gemma3.text.vocab import BYTE, NORMAL

MAX_SENTENCEPIECE_BYTES = 64 << 20  # Gemma 3's tokenizer.model is ~4.5 MiB


def read_sentencepiece_model(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pieces, scores and types of a SentencePiece `ModelProto`, checking every length against the buffer.

    Only three things are read: `pieces` (field 1: piece = 1, score = 2, type = 3) and
    `trainer_spec.model_type` (field 2.3), which must be BPE (2) for the merges to mean anything."""
    try:
        size = path.stat().st_size
        if size > MAX_SENTENCEPIECE_BYTES:
            raise CheckpointError(f"{path}: {size} bytes is too large for a tokenizer.model "
                                  f"(limit {MAX_SENTENCEPIECE_BYTES})")
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read tokenizer.model ({e.strerror})") from None
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    model_type = 1  # proto2 default: UNIGRAM
    for field, value in _proto_fields(data, path, _MODEL_FIELDS):
        if field == 1:
            piece, score, kind = None, 0.0, NORMAL
            for sub, sub_value in _proto_fields(value, path, _PIECE_FIELDS):
                if sub == 1:
                    try:
                        piece = str(sub_value, "utf-8")
                    except UnicodeDecodeError:
                        raise CheckpointError(f"{path}: piece #{len(pieces)} is not valid UTF-8") from None
                elif sub == 2:
                    (score,) = struct.unpack("<f", sub_value)  # 4 bytes: _proto_fields checked the wire type
                else:
                    kind = sub_value
            if piece is None:
                raise CheckpointError(f"{path}: piece #{len(pieces)} has no text")
            if not NORMAL <= kind <= BYTE:
                raise CheckpointError(f"{path}: piece #{len(pieces)} has unknown type {kind}")
            pieces.append(piece)
            scores.append(score)
            types.append(kind)
        else:
            for _, sub_value in _proto_fields(value, path, _TRAINER_FIELDS):
                model_type = sub_value
    if model_type != 2:
        raise CheckpointError(f"{path}: SentencePiece model type {model_type} is not BPE (2); "
                              "not a Gemma 3 tokenizer.model")
    return pieces, np.array(scores, dtype=np.float32), np.array(types, dtype=np.int64)


# Protobuf wire types: the only four a SentencePiece model may use (3 and 4, groups, and 6, 7 are rejected).
VARINT, I64, LEN, I32 = 0, 1, 2, 5
_WIRE_NAMES = {VARINT: "varint", I64: "64-bit", LEN: "length-delimited", I32: "32-bit"}
# The fields read, by message: number -> (wire type, name). Any other field is skipped.
_MODEL_FIELDS = {1: (LEN, "pieces"), 2: (LEN, "trainer_spec")}
_PIECE_FIELDS = {1: (LEN, "pieces.piece"), 2: (I32, "pieces.score"), 3: (VARINT, "pieces.type")}
_TRAINER_FIELDS = {3: (VARINT, "trainer_spec.model_type")}


def _proto_fields(buf: bytes | memoryview, path: Path,
                  known: Mapping[int, tuple[int, str]]) -> Iterator[tuple[int, int | bytes | memoryview]]:
    """(field number, value) pairs of the `known` fields of one protobuf message: varints as int, 32/64-bit
    fields as bytes, length-delimited fields as a memoryview. A known field with another wire type, an invalid
    wire type, or a truncated varint or length raises CheckpointError; unknown fields are skipped."""
    view = memoryview(buf)
    pos, end = 0, len(view)

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while shift < 70:
            if pos >= end:
                raise CheckpointError(f"{path}: truncated or corrupt tokenizer.model")
            byte = view[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7
        raise CheckpointError(f"{path}: malformed varint in tokenizer.model")

    while pos < end:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire not in _WIRE_NAMES:
            raise CheckpointError(f"{path}: corrupt tokenizer.model (field {field} has invalid wire type {wire})")
        if field in known and known[field][0] != wire:
            want, name = known[field]
            raise CheckpointError(f"{path}: corrupt tokenizer.model ({name}, field {field}, is "
                                  f"{_WIRE_NAMES[wire]}, not {_WIRE_NAMES[want]})")
        if wire == VARINT:
            value: int | bytes | memoryview = varint()
        else:
            n = {I64: 8, I32: 4}.get(wire) or varint()
            if n > end - pos:
                raise CheckpointError(f"{path}: truncated or corrupt tokenizer.model (field {field})")
            value = view[pos:pos + n] if wire == LEN else bytes(view[pos:pos + n])
            pos += n
        if field in known:
            yield field, value
