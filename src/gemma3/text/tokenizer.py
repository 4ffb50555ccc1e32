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
  every non-NORMAL piece, and that 0.0 decides where their merges rank (`vocab.ranking_scores`).
* GGUF stores no merges. They are derived from vocab + scores in the order HF's SentencePiece converter
  uses (`vocab.rank_merges`); ranking by raw GGUF score breaks code indentation and ranking by id (what
  transformers' GGUF loader does) splits every run of 32+ spaces differently.
* Which added tokens are `special` (skipped by `decode(skip_special_tokens=True)`) is not recorded;
  the official file marks the nine in `vocab.SPECIAL_TOKENS`.

Two engines run it, with the same ids: our BPE in C (`native_bpe`: smaller, and quicker to build) for a GGUF or
a tokenizer.model wherever the kernels compile; HF `tokenizers` (`hf_engine`, with the derived merges cached on
disk) for an HF tokenizer.json, which it loads as it is, and where nothing compiles. `engine=` on the
constructors chooses; `Tokenizer.engine` says which runs; docs/tokenizer.md has what each costs. The rules both
engines share are in `vocab`.

BOS policy (pitfall 19: Gemma wants exactly one `<bos>`): `encode(text, add_bos=True)` prepends `<bos>`
unless the text already starts with one. Text that spells a control token (`"<start_of_turn>"`,
`"<bos>"` ...) encodes to that token, as the official tokenizer does: the chat template relies on it.
Code that puts untrusted text into a prompt must decide whether to allow that before calling `encode`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gemma3.errors import CheckpointError, Gemma3Error
from gemma3.text import hf_engine, native_bpe
from gemma3.text.sentencepiece import read_sentencepiece_model
from gemma3.text.vocab import byte_value

ENGINES = ("auto", "native", "hf")


class Tokenizer:
    """Text <-> Gemma 3 token ids. Build it with `from_file`, `from_gguf`, `from_sentencepiece` or `from_dir`.

    `Tokenizer(backend)` wraps an HF `tokenizers.Tokenizer`, or an engine (`native_bpe.NativeBPE`,
    `hf_engine.HFEngine`)."""

    def __init__(self, backend: Any, source: str = "tokenizer"):
        self._engine = hf_engine.HFEngine(backend) if hf_engine.is_hf_tokenizer(backend) else backend
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
        # (The other llama.cpp edit, -1000 scores, is undone by `vocab.ranking_scores`.)
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
        pieces, scores, types = read_sentencepiece_model(path)
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
        llguidance). With the native engine, the HF form is built for this (an HF build's time) and not kept."""
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
        value = byte_value(piece.encode("utf-8"))
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


# ------------------------------------------------------------------------------------------- the engines
def _engine_for(pieces: list[str], scores: Any, types: Any, source: str, engine: str = "auto") -> Any:
    """The engine for SentencePiece-style vocab arrays: ours (`native_bpe`) unless `engine` is "hf" or it does
    not build ("auto" then falls back to HF `tokenizers`; "native" raises)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine != "hf":
        lib = native_bpe.library()
        if lib is not None:
            return native_bpe.from_vocab(pieces, scores, types, source, lib)
        if engine == "native":
            from gemma3.kernels import bpe_library

            raise Gemma3Error(f"{source}: the native tokenizer engine is unavailable ({bpe_library()[1]})")
    return hf_engine.HFEngine(hf_engine.build_cached(pieces, scores, types, source))
