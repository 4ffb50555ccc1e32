"""Gemma 3's tokenizer run by HF `tokenizers`: the engine for an HF tokenizer.json, and the fallback for
SentencePiece-style vocab arrays (GGUF, tokenizer.model) where the native engine does not build.

From such arrays the official `tokenizer.json` is rebuilt exactly (`assemble`): this is what `transformers`'
`GemmaConverter` does to a `tokenizer.model`, minus the detour through `sentencepiece` and protobuf, and with the
special flags of the published file. The merges are derived in Python (`_bpe_merges`, ranked by
`vocab.rank_merges`) and kept in an on-disk cache (`build_cached`), since deriving them is the slow part.
`tokenizers` itself is imported only when this engine runs.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemma3.errors import CheckpointError
from gemma3.files import owned_and_private, temp_path, user_cache_dir
from gemma3.text.vocab import (SPECIAL_TOKENS, added_ids, checked_arrays, extra_tokens, rank_merges, ranking_scores,
                               require_pieces, utf8_of)


def _check_texts(texts: Sequence[str]) -> None:
    """The one-line error the native engine gives for a str that UTF-8 cannot hold (a TypeError for a non-str
    stays one: a caller's mistake, not input)."""
    for text in texts:
        if isinstance(text, str):
            utf8_of(text)


def is_hf_tokenizer(backend: Any) -> bool:
    """Whether `backend` is an HF `tokenizers.Tokenizer`, told without importing `tokenizers`: the native
    engine never needs it, and importing it costs memory for nothing."""
    kind = type(backend)
    return kind.__name__ == "Tokenizer" and kind.__module__.split(".")[0] == "tokenizers"


class HFEngine:
    """HF `tokenizers` behind the interface `native_bpe.NativeBPE` has."""

    name = "hf"

    def __init__(self, backend: Any):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str) -> list[int]:
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:  # `tokenizers` says only "TextInputSequence must be str", for a lone surrogate too
            _check_texts([text])
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:  # the Rust engine spreads them over threads
        texts = list(texts)
        try:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            _check_texts(texts)
            raise

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, index: int) -> str:
        return self.backend.id_to_token(index)

    def token_to_id(self, piece: str) -> int | None:
        return self.backend.token_to_id(piece)

    def to_json(self) -> str:
        return self.backend.to_str(pretty=True)


# ------------------------------------------------------------------------------ the rebuilt tokenizer, cached
CACHE_FORMAT = 2  # bump when what the cache keeps changes (2: merges as piece-id pairs, not tokenizer.json)


def tokenizer_cache_dir() -> Path:
    """Where rebuilt tokenizers are kept: $GEMMA3_TOKENIZER_CACHE, else $XDG_CACHE_HOME/gemma3/tokenizers
    (~/.cache/gemma3/tokenizers). GEMMA3_TOKENIZER_CACHE=0 turns the cache off."""
    return user_cache_dir("tokenizers", "GEMMA3_TOKENIZER_CACHE")


def build_cached(pieces: list[str], scores: Any, types: Any, source: str) -> Any:
    """`_build`, with the merges it derives kept in the cache: an (M, 2) int32 .npy of the merged pieces' ids,
    named by a hash of everything they were derived from (the pieces, scores and types, this cache format) and
    by a hash of the file's own bytes. Deriving the merges in Python is the slow part of the build; only they are
    kept, not the whole tokenizer.json, whose parsing peaks higher than this build (docs/tokenizer.md has the
    figures). A file whose bytes do not match its name, one not ours or writable by others, or one that does not
    hold valid merges is not used: the merges are derived again and kept again. A cache that cannot be written
    costs only the time."""
    import hashlib
    import io

    if os.environ.get("GEMMA3_TOKENIZER_CACHE") == "0":
        return _build(pieces, scores, types, source)
    try:
        key = hashlib.sha256(f"{CACHE_FORMAT}\0".encode())
        key.update("\0".join(pieces).encode("utf-8", "surrogatepass"))
        key.update(np.asarray(scores, dtype=np.float64).tobytes())
        key.update(np.asarray(types, dtype=np.int64).tobytes())
    except (TypeError, ValueError, OverflowError):
        return _build(pieces, scores, types, source)  # let _build name what is wrong
    directory, name = tokenizer_cache_dir(), key.hexdigest()[:32]
    with contextlib.suppress(OSError):
        for path in sorted(directory.glob(f"{name}.*.npy")):
            data = path.read_bytes() if owned_and_private(path) else b""
            if data and hashlib.sha256(data).hexdigest()[:16] == path.name.split(".")[1]:
                with contextlib.suppress(ValueError, OSError):
                    merges = np.load(io.BytesIO(data), allow_pickle=False)
                    if merges.dtype == np.int32 and merges.ndim == 2 and merges.shape[1] == 2 and (
                            merges.size == 0 or (merges.min() >= 0 and merges.max() < len(pieces))):
                        return _build(pieces, scores, types, source, merges)
    scores, types, vocab = _checked(pieces, scores, types, source)
    merges = _derived_merges(pieces, vocab, scores, types)
    backend = assemble(pieces, vocab, types, merges)
    with contextlib.suppress(OSError):
        buffer = io.BytesIO()
        np.save(buffer, merges, allow_pickle=False)
        data = buffer.getvalue()
        path = directory / f"{name}.{hashlib.sha256(data).hexdigest()[:16]}.npy"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for old in directory.glob(f"{name}.*.npy"):  # a spoiled copy under the same key
            old.unlink()
        for old in directory.glob("*.*.json"):  # what CACHE_FORMAT 1 kept (whole tokenizer.json files)
            if re.fullmatch(r"[0-9a-f]{32}\.[0-9a-f]{16}\.json", old.name) and owned_and_private(old):
                old.unlink()
        tmp = temp_path(path)
        try:
            tmp.write_bytes(data)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return backend


def _checked(pieces: list[str], scores: Any, types: Any, source: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(scores, types, vocab) of SentencePiece-style vocab arrays, or a CheckpointError naming what is wrong."""
    scores, types = checked_arrays(pieces, scores, types, source)
    vocab = {piece: index for index, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise CheckpointError(f"{source}: the tokenizer vocabulary has duplicate pieces")
    require_pieces(vocab, source)
    return scores, types, vocab


def _derived_merges(pieces: list[str], vocab: Mapping[str, int], scores: np.ndarray, types: np.ndarray) -> np.ndarray:
    with _gc_paused():
        return _bpe_merges(pieces, vocab, ranking_scores(scores, types))


def _build(pieces: list[str], scores: Any, types: Any, source: str, merges: np.ndarray | None = None) -> Any:
    """The official Gemma 3 `tokenizer.json`, as an HF tokenizer, from SentencePiece-style vocab arrays (and the
    merges they imply, as piece-id pairs, when already derived)."""
    scores, types, vocab = _checked(pieces, scores, types, source)
    return assemble(pieces, vocab, types, _derived_merges(pieces, vocab, scores, types) if merges is None else merges)


def assemble(pieces: list[str], vocab: dict[str, int], types: np.ndarray, merges: np.ndarray) -> Any:
    """The HF tokenizer from checked vocab arrays and their merges (piece-id pairs)."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    with _gc_paused():
        pairs = [(pieces[a], pieces[b]) for a, b in merges.tolist()]
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token="<unk>", fuse_unk=True,
                                      byte_fallback=True))
        del pairs
    backend.normalizer = normalizers.Replace(" ", "▁")
    # A no-op after the normalizer (no spaces remain), kept because the official file has it.
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos>:1 $B:1", special_tokens=[("<bos>", vocab["<bos>"])])
    # the extra tokens take the next free ids, as in the official file
    added = [pieces[i] for i in added_ids(types)] + [content for content, _ in extra_tokens(vocab, len(pieces))]
    backend.add_tokens([AddedToken(p, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                   special=p in SPECIAL_TOKENS) for p in added])
    return backend


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The rebuild creates millions of small objects that all stay alive; pausing the cyclic garbage collector
    saves it from rescanning them again and again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _bpe_merges(pieces: list[str], vocab: Mapping[str, int], scores: np.ndarray) -> np.ndarray:
    """BPE merges implied by a SentencePiece BPE vocabulary, in the official order: every split of a piece into
    two vocab entries (found here in Python; the native engine finds the same ones in C), ranked by
    `vocab.rank_merges` with `scores` (`vocab.ranking_scores`). Returns them as (M, 2) int32 ids of the left and
    right pieces."""
    lefts: list[int] = []  # ids of the two pieces each merge joins
    rights: list[int] = []
    owner: list[int] = []  # id of the piece each merge produces
    cut: list[int] = []  # length of its left part
    for index, piece in enumerate(pieces):
        for k in range(1, len(piece)):
            left = vocab.get(piece[:k])
            if left is not None:
                right = vocab.get(piece[k:])
                if right is not None:
                    lefts.append(left)
                    rights.append(right)
                    owner.append(index)
                    cut.append(k)
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    order = rank_merges(np.array(owner, dtype=np.int64), np.array(cut, dtype=np.int64), lengths, scores)
    return np.stack([np.array(lefts, dtype=np.int32), np.array(rights, dtype=np.int32)], axis=1)[order]
