"""The Gemma 3 tokenizer: SentencePiece BPE with byte fallback.

One `Tokenizer` class, three sources, the same ids from each:

* the official `tokenizer.json` (loaded as is);
* the `tokenizer.ggml.*` arrays of a GGUF file, rebuilt into exactly the official `tokenizer.json`
  (`save` writes it back byte for byte);
* a SentencePiece `tokenizer.model`, read with a small bounded protobuf parser (no `sentencepiece` or
  `protobuf` dependency).

What an exact rebuild from GGUF has to undo (spec §12, pitfall 24):

* llama.cpp spells the whitespace pieces (ids 138-167) with real spaces; the official vocab uses `▁`.
* llama.cpp overwrote the scores of CONTROL and USER_DEFINED pieces with -1000; SentencePiece had 0.0 for
  every non-NORMAL piece, and that 0.0 decides where their merges rank.
* GGUF stores no merges. They are derived from vocab + scores in the order HF's SentencePiece converter
  uses (`_bpe_merges`); ranking by raw GGUF score breaks code indentation and ranking by id (what
  transformers' GGUF loader does) splits every run of 32+ spaces differently.
* Which added tokens are `special` (skipped by `decode(skip_special_tokens=True)`) is not recorded;
  the official file marks the nine in `SPECIAL_TOKENS`.

Two engines run it, with the same ids: our BPE in C (`gemma3.bpe`, ~20 MB, built in ~0.1 s) for a GGUF or a
tokenizer.model wherever the kernels compile; HF `tokenizers` (~95 MB, ~1 s to build, with the derived merges
cached on disk) for an HF tokenizer.json, which it loads as it is, and where nothing compiles. `engine=` on
the constructors chooses; `Tokenizer.engine` says which runs.

BOS policy (pitfall 19: Gemma wants exactly one `<bos>`): `encode(text, add_bos=True)` prepends `<bos>`
unless the text already starts with one. Text that spells a control token (`"<start_of_turn>"`,
`"<bos>"` ...) encodes to that token, as the official tokenizer does: the chat template relies on it.
Code that puts untrusted text into a prompt must decide whether to allow that before calling `encode`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemma3.bpe import _byte_value
from gemma3.errors import CheckpointError, Gemma3Error

# SentencePiece piece types (sentencepiece_model.proto); GGUF's `tokenizer.ggml.token_type` uses the same codes.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_ADDED_TYPES = (UNKNOWN, CONTROL, USER_DEFINED)  # matched whole in raw text, never split or merged

# The added tokens the official tokenizer.json marks `special`. The multimodal `<image_soft_token>` is in no
# SentencePiece or GGUF vocab: HF appends it after the 262 144 pieces, so it gets id 262 144.
IMAGE_SOFT_TOKEN = "<image_soft_token>"
SPECIAL_TOKENS = frozenset({"<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                            "<start_of_image>", "<end_of_image>", IMAGE_SOFT_TOKEN})

MAX_SENTENCEPIECE_BYTES = 64 << 20  # Gemma 3's tokenizer.model is ~4.5 MiB


ENGINES = ("auto", "native", "hf")


def _is_hf_tokenizer(backend: Any) -> bool:
    """Whether `backend` is an HF `tokenizers.Tokenizer`, told without importing `tokenizers`: the native
    engine never needs it, and importing it costs ~7 MB of memory for nothing."""
    kind = type(backend)
    return kind.__name__ == "Tokenizer" and kind.__module__.split(".")[0] == "tokenizers"


class _HFEngine:
    """HF `tokenizers` behind the interface `gemma3.bpe.NativeBPE` has."""

    name = "hf"

    def __init__(self, backend: Any):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:  # the Rust engine spreads them over threads
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, index: int) -> str:
        return self.backend.id_to_token(index)

    def token_to_id(self, piece: str) -> int | None:
        return self.backend.token_to_id(piece)

    def to_json(self) -> str:
        return self.backend.to_str(pretty=True)


class Tokenizer:
    """Text <-> Gemma 3 token ids. Build it with `from_file`, `from_gguf`, `from_sentencepiece` or `from_dir`.

    `Tokenizer(backend)` wraps an HF `tokenizers.Tokenizer` (or an engine of this module's own)."""

    def __init__(self, backend: Any, source: str = "tokenizer"):
        self._engine = _HFEngine(backend) if _is_hf_tokenizer(backend) else backend
        self.engine = self._engine.name
        self.source = source
        self.vocab_size = self._engine.vocab_size

        def require(piece: str) -> int:
            index = self._engine.token_to_id(piece)
            if index is None:
                raise CheckpointError(f"{source}: not a Gemma 3 tokenizer (no {piece} token)")
            return index

        self.pad_id = require("<pad>")
        self.eos_id = require("<eos>")
        self.bos_id = require("<bos>")
        self.start_of_turn_id = require("<start_of_turn>")
        self.end_of_turn_id = require("<end_of_turn>")
        # What decode(skip_special_tokens=True) drops; a streaming detokenizer needs the same set.
        self.special_ids = self._engine.special_ids

    # ------------------------------------------------------------------------------------------- sources
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load an HF `tokenizer.json` unchanged (a regular file of at most 512 MiB: the official one is 33 MB,
        and a device such as /dev/zero would be read without end)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: cannot load tokenizer.json (no such regular file)")
        if path.stat().st_size > 512 << 20:
            raise CheckpointError(f"{path}: {path.stat().st_size / 2**20:.0f} MiB is too large for a tokenizer.json")
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for both I/O and parse errors
            raise CheckpointError(f"{path}: cannot load tokenizer.json ({e})") from None
        return cls(backend, str(path))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, engine: str = "auto") -> Tokenizer:
        """Rebuild the official tokenizer from the `tokenizer.ggml.*` metadata of a GGUF file."""
        # Imported here so that using the tokenizer does not pay for importing torch.
        from gemma3.weights.gguf.reader import read_gguf_metadata

        return cls.from_gguf_metadata(read_gguf_metadata(path), source=str(path), engine=engine)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str = "GGUF metadata",
                           engine: str = "auto") -> Tokenizer:
        """Rebuild the official tokenizer from GGUF metadata already read (`tokenizer.ggml.*` keys)."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "llama":
            raise CheckpointError(f"{source}: tokenizer.ggml.model is {model!r}; Gemma 3 uses 'llama' "
                                  "(SentencePiece)")
        try:
            pieces = metadata["tokenizer.ggml.tokens"]
            scores = metadata["tokenizer.ggml.scores"]
            types = metadata["tokenizer.ggml.token_type"]
        except KeyError as e:
            raise CheckpointError(f"{source}: no {e.args[0]} in the metadata") from None
        # Spaces back to `▁`: no SentencePiece piece holds a real space, the normalizer replaced them all.
        # (The other llama.cpp edit, -1000 scores, is undone in `_build`.)
        try:
            pieces = [p.replace(" ", "▁") if " " in p else p for p in pieces] if isinstance(pieces, list) else None
        except TypeError:  # `" " in p` of a non-string
            pieces = None
        if pieces is None or set(map(type, pieces)) - {str}:
            raise CheckpointError(f"{source}: tokenizer.ggml.tokens is not a list of strings")
        return cls(_engine_for(pieces, scores, types, source, engine), source)

    @classmethod
    def from_sentencepiece(cls, path: str | os.PathLike, engine: str = "auto") -> Tokenizer:
        """Build the official tokenizer from a SentencePiece `tokenizer.model` (BPE, as Gemma 3 ships it)."""
        path = Path(path)
        pieces, scores, types = _read_sentencepiece_model(path)
        return cls(_engine_for(pieces, scores, types, str(path), engine), str(path))

    @classmethod
    def from_dir(cls, path: str | os.PathLike, engine: str = "auto") -> Tokenizer:
        """Load a checkpoint directory's `tokenizer.json`, or its `tokenizer.model` when there is no json."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            return cls.from_file(path / "tokenizer.json")
        if (path / "tokenizer.model").is_file():
            return cls.from_sentencepiece(path / "tokenizer.model", engine=engine)
        raise CheckpointError(f"{path}: no tokenizer.json or tokenizer.model in this directory")

    def save(self, path: str | os.PathLike) -> None:
        """Write `tokenizer.json` (HF's pretty layout; byte-identical to the official file for Gemma 3).

        Written to a temporary file and renamed, so an interrupted save never leaves a truncated file."""
        from gemma3.files import temp_path

        path = Path(path)
        tmp = temp_path(path)
        try:
            tmp.write_bytes(self.to_json().encode("utf-8"))  # no newline translation
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def to_json(self) -> str:
        """The tokenizer as HF's `tokenizer.json` text (for `save`, and for libraries that take the file, such as
        llguidance). With the native engine, the HF form is built for this (~1 s) and not kept."""
        return self._engine.to_json()

    # -------------------------------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, with one leading `<bos>` if `add_bos` (none added if the text starts with one)."""
        ids = self._engine.encode(text)
        return self._with_bos(ids) if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        """`encode` over many texts."""
        return [self._with_bos(ids) if add_bos else ids for ids in self._engine.encode_batch(texts)]

    def _with_bos(self, ids: list[int]) -> list[int]:
        return ids if ids[:1] == [self.bos_id] else [self.bos_id, *ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Byte tokens that do not form valid UTF-8 come out as U+FFFD, one per byte token."""
        return self._engine.decode(self._checked(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, index: int) -> bytes:
        """The exact bytes token `index` contributes to decoded text: `▁` -> space, `<0xNN>` -> that one byte,
        added and special tokens -> their text. Joining these and decoding the result incrementally lets a
        streaming detokenizer hold back half a UTF-8 character instead of printing U+FFFD."""
        (index,) = self._checked([index])
        piece = self._engine.id_to_token(index)
        # The same rule as the `ByteFallback` decoder: any piece spelled <0xNN> is one raw byte.
        value = _byte_value(piece.encode("utf-8"))
        return piece.replace("▁", " ").encode("utf-8") if value is None else bytes([value])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids` (`token_bytes` joined); `decode` is this decoded as UTF-8 when it is valid."""
        return b"".join(self.token_bytes(i) for i in ids)

    def _checked(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise Gemma3Error(f"{self.source}: token id {i} is outside the vocabulary "
                                  f"(0..{self.vocab_size - 1})")
        return ids

    # ---------------------------------------------------------------------------------- pieces <-> ids
    def id_to_piece(self, index: int) -> str:
        """The vocabulary entry of `index`, as spelled in tokenizer.json (`▁` for spaces, `<0xNN>` for bytes)."""
        (index,) = self._checked([index])
        return self._engine.id_to_token(index)

    def token_to_id(self, piece: str) -> int | None:
        """Id of a vocabulary entry, or None if there is no such piece."""
        return self._engine.token_to_id(piece)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, engine={self.engine!r})"


# ------------------------------------------------------------------------------------------- the rebuild
# ------------------------------------------------------------------------------ the rebuilt tokenizer, cached
CACHE_FORMAT = 2  # bump when what the cache keeps changes (2: merges as piece-id pairs, not tokenizer.json)


def tokenizer_cache_dir() -> Path:
    """Where rebuilt tokenizers are kept: $GEMMA3_TOKENIZER_CACHE, else $XDG_CACHE_HOME/gemma3/tokenizers
    (~/.cache/gemma3/tokenizers). GEMMA3_TOKENIZER_CACHE=0 turns the cache off."""
    if os.environ.get("GEMMA3_TOKENIZER_CACHE"):
        return Path(os.environ["GEMMA3_TOKENIZER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gemma3" / "tokenizers"


def _build_cached(pieces: list[str], scores: Any, types: Any, source: str) -> Any:
    """`_build`, with the merges it derives kept in the cache: an (M, 2) int32 .npy of the merged pieces' ids,
    named by a hash of everything they were derived from (the pieces, scores and types, this cache format) and
    by a hash of the file's own bytes. Deriving 514k merges in Python takes ~1.5-2 s; reading 4 MB back and
    handing them to `tokenizers` ~1 s. (Until 2026-12-02 the whole tokenizer.json was kept: as fast to read,
    but parsing its 33 MB of JSON took 440 MB at its peak against 260 MB for this build.) A file whose bytes
    do not match its name, one not ours or writable by others, or one that does not hold valid merges is not
    used: the merges are derived again and kept again. A cache that cannot be written costs only the time."""
    import hashlib
    import io

    from gemma3.kernels import _owned_and_private  # the kernel cache's check: ours, writable by nobody else

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
            data = path.read_bytes() if _owned_and_private(path) else b""
            if data and hashlib.sha256(data).hexdigest()[:16] == path.name.split(".")[1]:
                with contextlib.suppress(ValueError, OSError):
                    merges = np.load(io.BytesIO(data), allow_pickle=False)
                    if merges.dtype == np.int32 and merges.ndim == 2 and merges.shape[1] == 2 and (
                            merges.size == 0 or (merges.min() >= 0 and merges.max() < len(pieces))):
                        return _build(pieces, scores, types, source, merges)
    scores, types, vocab = _checked(pieces, scores, types, source)
    merges = _derived_merges(pieces, vocab, scores, types)
    backend = _assemble(pieces, vocab, types, merges)
    with contextlib.suppress(OSError):
        from gemma3.files import temp_path

        buffer = io.BytesIO()
        np.save(buffer, merges, allow_pickle=False)
        data = buffer.getvalue()
        path = directory / f"{name}.{hashlib.sha256(data).hexdigest()[:16]}.npy"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for old in directory.glob(f"{name}.*.npy"):  # a spoiled copy under the same key
            old.unlink()
        for old in directory.glob("*.*.json"):  # what CACHE_FORMAT 1 kept (whole tokenizer.json files, ~14 MB)
            if re.fullmatch(r"[0-9a-f]{32}\.[0-9a-f]{16}\.json", old.name) and _owned_and_private(old):
                old.unlink()
        tmp = temp_path(path)
        try:
            tmp.write_bytes(data)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return backend


def _engine_for(pieces: list[str], scores: Any, types: Any, source: str, engine: str = "auto") -> Any:
    """The engine for SentencePiece-style vocab arrays: ours (`gemma3.bpe`) unless `engine` is "hf" or it does
    not build ("auto" then falls back to HF `tokenizers`; "native" raises)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine != "hf":
        from gemma3 import bpe

        lib = bpe.library()
        if lib is not None:
            scores, types = _checked_arrays(pieces, scores, types, source)
            for piece in ("<unk>", "<bos>"):
                if piece not in pieces:
                    raise CheckpointError(f"{source}: not a Gemma 3 tokenizer (no {piece} token)")
            added = np.flatnonzero(np.isin(types, _ADDED_TYPES))
            extra = [] if IMAGE_SOFT_TOKEN in pieces else [(IMAGE_SOFT_TOKEN, len(pieces))]
            return bpe.NativeBPE(pieces, scores, types, added, extra, SPECIAL_TOKENS, source, lib)
        if engine == "native":
            from gemma3.kernels import bpe_library

            raise Gemma3Error(f"{source}: the native tokenizer engine is unavailable ({bpe_library()[1]})")
    return _HFEngine(_build_cached(pieces, scores, types, source))


def _checked_arrays(pieces: list[str], scores: Any, types: Any, source: str) -> tuple[np.ndarray, np.ndarray]:
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
    if not np.isin(types, (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)).all():
        raise CheckpointError(f"{source}: unknown token type in the tokenizer")
    return scores, types


def _checked(pieces: list[str], scores: Any, types: Any, source: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(scores, types, vocab) of SentencePiece-style vocab arrays, or a CheckpointError naming what is wrong."""
    scores, types = _checked_arrays(pieces, scores, types, source)
    vocab = {piece: index for index, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise CheckpointError(f"{source}: the tokenizer vocabulary has duplicate pieces")
    for piece in ("<unk>", "<bos>"):
        if piece not in vocab:
            raise CheckpointError(f"{source}: not a Gemma 3 tokenizer (no {piece} token)")
    return scores, types, vocab


def _derived_merges(pieces: list[str], vocab: Mapping[str, int], scores: np.ndarray, types: np.ndarray) -> np.ndarray:
    # SentencePiece gives every non-NORMAL piece score 0.0, which ranks their merges first.
    with _gc_paused():
        return _bpe_merges(pieces, vocab, np.where(types == NORMAL, scores, 0.0))


def _build(pieces: list[str], scores: Any, types: Any, source: str, merges: np.ndarray | None = None) -> Any:
    """The official Gemma 3 `tokenizer.json`, as an HF tokenizer, from SentencePiece-style vocab arrays (and the
    merges they imply, as piece-id pairs, when already derived).

    This is what `transformers`' `GemmaConverter` does to a `tokenizer.model`, minus the detour through
    `sentencepiece` and protobuf, and with the special flags of the published file."""
    scores, types, vocab = _checked(pieces, scores, types, source)
    return _assemble(pieces, vocab, types, _derived_merges(pieces, vocab, scores, types) if merges is None else merges)


def _assemble(pieces: list[str], vocab: dict[str, int], types: np.ndarray, merges: np.ndarray) -> Any:
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
    added = [pieces[i] for i in np.flatnonzero(np.isin(types, _ADDED_TYPES))]
    if IMAGE_SOFT_TOKEN not in vocab:
        added.append(IMAGE_SOFT_TOKEN)  # takes the next free id, as in the official file
    backend.add_tokens([AddedToken(p, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                   special=p in SPECIAL_TOKENS) for p in added])
    return backend


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The rebuild creates ~2 M small objects that all stay alive; pausing the cyclic garbage collector
    saves it from rescanning them again and again (~20 % of the build time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _bpe_merges(pieces: list[str], vocab: Mapping[str, int], scores: np.ndarray) -> np.ndarray:
    """BPE merges implied by a SentencePiece BPE vocabulary, in the official order.

    SentencePiece BPE has no merge list: a piece is any vocab entry, preferred by score. HF's converter
    (`transformers.tokenization_utils_base.generate_merges` with scores) turns that into merges: every split
    of a piece into two vocab entries is a merge, ranked by (piece score desc, left length desc, right
    length desc); equal keys (only possible between pieces of equal score) stay in id order. The same ranking
    here is one `lexsort` over the found splits instead of per-piece Python sorts: ~1 s instead of ~3 s
    for Gemma 3's 514 906 merges. Returns them as (M, 2) int32 ids of the left and right pieces."""
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
    owner_ids = np.array(owner, dtype=np.int64)
    left_len = np.array(cut, dtype=np.int64)
    right_len = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))[owner_ids] - left_len
    # np.lexsort sorts by the last key first.
    order = np.lexsort((owner_ids, -right_len, -left_len, -scores[owner_ids]))
    return np.stack([np.array(lefts, dtype=np.int32), np.array(rights, dtype=np.int32)], axis=1)[order]


# ------------------------------------------------------------------------------- SentencePiece protobuf
def _read_sentencepiece_model(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
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
