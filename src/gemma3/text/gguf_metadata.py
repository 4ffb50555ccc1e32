"""The tokenizer as GGUF stores it: the `tokenizer.ggml.*` keys rebuilt from an HF tokenizer.json, for
`gemma3 convert --to gguf` (the inverse of `Tokenizer.from_gguf_metadata`). GGUF's token types are
SentencePiece's piece types (gemma3.text.vocab).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from gemma3.errors import CheckpointError
from gemma3.text.vocab import BYTE, CONTROL, NORMAL, USER_DEFINED

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
