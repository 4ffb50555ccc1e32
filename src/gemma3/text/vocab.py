"""The vocabulary rules both tokenizer engines share (`native_bpe` and `hf_engine`), each written once: the
SentencePiece piece types, which pieces are added tokens and which of those are `special`, the `<0xNN>` byte
pieces, the checks of the vocab arrays, and how the merges a SentencePiece BPE vocabulary implies are ranked.

SentencePiece BPE has no merge list: a piece is any vocab entry, preferred by score. HF's converter
(`transformers.tokenization_utils_base.generate_merges` with scores) turns that into merges: every split of a
piece into two vocab entries is a merge, ranked as `rank_merges` ranks them. Each engine finds the splits its own
way (bpe.c, or Python in `hf_engine`); the ranking of the splits is this module's.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any

import numpy as np

from gemma3.errors import CheckpointError, Gemma3Error

# SentencePiece piece types (sentencepiece_model.proto); GGUF's `tokenizer.ggml.token_type` uses the same codes.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PIECE_TYPES = (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)
ADDED_TYPES = (UNKNOWN, CONTROL, USER_DEFINED)  # matched whole in raw text, never split or merged

# The added tokens the official tokenizer.json marks `special`. The multimodal `<image_soft_token>` is in no
# SentencePiece or GGUF vocab: HF appends it after the 262 144 pieces, so it gets id 262 144.
IMAGE_SOFT_TOKEN = "<image_soft_token>"
SPECIAL_TOKENS = frozenset({"<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                            "<start_of_image>", "<end_of_image>", IMAGE_SOFT_TOKEN})
REQUIRED_PIECES = ("<unk>", "<bos>")  # what the BPE model (unk) and the post-processor (bos) name


def added_ids(types: np.ndarray) -> np.ndarray:
    """Ids of the pieces matched whole in raw text (the added tokens among the pieces)."""
    return np.flatnonzero(np.isin(types, ADDED_TYPES))


def extra_tokens(pieces: Container[str], n_pieces: int) -> list[tuple[str, int]]:
    """The added tokens past the pieces, (content, id): `<image_soft_token>` at the next free id, as in the
    official file, unless the vocabulary has it."""
    return [] if IMAGE_SOFT_TOKEN in pieces else [(IMAGE_SOFT_TOKEN, n_pieces)]


def byte_value(piece: bytes) -> int | None:
    """The byte a `<0xNN>` piece stands for, by the rule of HF's ByteFallback decoder: six bytes, `<0x` ... `>`,
    and Rust's `u8::from_str_radix` of the two in between (hex digits of either case, or `+` and one digit)."""
    if len(piece) != 6 or not piece.startswith(b"<0x") or not piece.endswith(b">"):
        return None
    digits = piece[3:5]
    body = digits[1:] if digits[:1] == b"+" else digits
    if not body or any(c not in b"0123456789abcdefABCDEF" for c in body):
        return None
    return int(body, 16)


# ------------------------------------------------------------------------------------------------ checks
def checked_arrays(pieces: Sequence[str], scores: Any, types: Any, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores as float64, types as int64) of SentencePiece-style vocab arrays, or a CheckpointError."""
    try:
        scores = np.asarray(scores, dtype=np.float64)
        types = np.asarray(types, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{source}: tokenizer scores or token types are not numbers") from None
    n = len(pieces)
    if not n or scores.shape != (n,) or types.shape != (n,):
        raise CheckpointError(f"{source}: tokenizer arrays disagree in length ({n} pieces, "
                              f"{scores.size} scores, {types.size} types)")
    if not np.isin(types, PIECE_TYPES).all():
        raise CheckpointError(f"{source}: unknown token type in the tokenizer")
    return scores, types


def require_pieces(vocab: Container[str], source: str) -> None:
    """A CheckpointError unless the vocabulary has the pieces a Gemma 3 tokenizer cannot do without."""
    for piece in REQUIRED_PIECES:
        if piece not in vocab:
            raise CheckpointError(f"{source}: not a Gemma 3 tokenizer (no {piece} token)")


# ------------------------------------------------------------------------------------------------ merges
def ranking_scores(scores: np.ndarray, types: np.ndarray) -> np.ndarray:
    """The scores merges are ranked by. SentencePiece gives every non-NORMAL piece score 0.0, which ranks their
    merges first (llama.cpp writes -1000 for CONTROL and USER_DEFINED pieces in a GGUF: undone here)."""
    return np.where(types == NORMAL, scores, 0.0)


def rank_merges(owner: np.ndarray, left_chars: np.ndarray, char_lengths: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The order of the candidate merges (owner piece, left part's length in characters), the ranking of HF's
    SentencePiece converter: by the owner's score (`ranking_scores`) descending, then left length descending,
    right length descending; equal keys (only possible between pieces of equal score) stay in id order. One
    `lexsort` over all the splits instead of the converter's per-piece sorts."""
    owner = owner.astype(np.int64)
    left_len = left_chars.astype(np.int64)
    right_len = char_lengths[owner] - left_len
    return np.lexsort((owner, -right_len, -left_len, -scores[owner]))  # the last key sorts first


def utf8_of(text: str) -> bytes:
    """`text` as UTF-8, or the one-line Gemma3Error both engines give for what UTF-8 cannot hold: a lone surrogate
    (what `open(..., errors="surrogateescape")` or argv makes of bytes that are not UTF-8)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Gemma3Error(f"text to tokenize is not valid Unicode (a lone surrogate at index {e.start})") from None
