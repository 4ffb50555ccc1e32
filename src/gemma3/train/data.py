"""Training data: documents → a memory-mapped token file (tokenized once) → fixed-length packed sequences.

Sources (`read_documents`):
* plain text files (``.txt``, ``.md`` ...): one document per file;
* JSONL (``.jsonl`` / ``.json`` lines): ``{"text": ...}`` per line; ``{"messages": [...]}`` for chat SFT, with
  ``"tools": [...]`` beside it for tool calling (OpenAI's and TRL's format: assistant ``tool_calls``, ``role:
  "tool"`` results); or ``{"prompt": ..., "completion": ...}`` pairs (strings, or lists of messages);
* directories: every ``*.txt``, ``*.md`` and ``*.jsonl`` below them, in sorted order;
* Hugging Face datasets: ``hf:NAME`` or ``hf:NAME@SPLIT`` (a hub name when online, or a local file or
  directory that `datasets.load_dataset` understands: parquet, csv, json, arrow ...).

A *chat* document is rendered by the renderer the server uses (gemma3.text.chat: the Gemma 3 format, or
FunctionGemma's when the record has tools or calls), so training and serving see the same tokens. Its target
mask is 1 only on what the model writes: its answers with their `<end_of_turn>`, its calls with the
`<start_function_response>` that ends them (the server's stop string); never the system text, the tool
declarations, the user's turns or the tool results. A prompt/completion pair of strings is ``<bos> prompt
completion <eos>`` with the completion and `<eos>` as targets (TRL's completion-only loss). A *text* document
is ``<bos> text`` and every token but the `<bos>` is a target.

The token file (`TokenFile`) is three flat arrays written once: token ids (uint32), the target mask
(uint8) and document offsets (int64), plus a JSON header naming what produced them. It is keyed by a
fingerprint of the sources and the tokenizer, so a second run (or every rank of a distributed run) maps
the same file instead of tokenizing again.

Packing (`PackedDataset`) builds fixed-length sequences of `seq_len` tokens:
* ``stream`` (text): documents are concatenated, each starting with its `<bos>`, and cut into windows that
  overlap by one token, so every token is a target exactly once;
* ``whole`` (chat): conversations are never split (an answer without its question teaches nothing); they
  are packed first-fit into sequences and the rest is padding (label -100). Each conversation's positions
  start again at 0, and the model reads a restart as a document boundary (gemma3.model.attention_mask): a
  packed conversation sees only itself, so it has the loss it would have alone, with none of the padding's
  compute. A conversation longer than `seq_len` is an error that names it.
The held-out split is a seeded choice of whole documents (or the tail of the only document there is).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from gemma3.errors import Gemma3Error
from gemma3.files import remove_stale_temp, temp_path
from gemma3.model import IGNORE_INDEX
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
TOKEN_FILE_VERSION = 2  # 2: chat records render their tools; prompt/completion pairs


class DataError(Gemma3Error, ValueError):
    """Unusable training data: an empty dataset, a malformed record, a sequence that does not fit."""


@dataclass(frozen=True)
class Document:
    """One training document before tokenization: plain text, or a chat conversation (`messages`)."""

    text: str | None = None
    messages: list | None = None
    tools: list | None = None  # OpenAI tool declarations for a chat document
    completion: str | None = None  # a prompt/completion pair of strings: `text` is the prompt
    where: str = ""  # "file:line" for error messages


# ---------------------------------------------------------------------------------------------- reading
def expand_sources(sources: Sequence[str]) -> list[str]:
    """Files and `hf:` specs, with directories expanded to their text/JSONL files (sorted, so the order and
    therefore the fingerprint and the split are the same on every machine)."""
    out: list[str] = []
    for spec in sources:
        if spec.startswith("hf:"):
            out.append(spec)
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            found = sorted(_data_files(path))
            if not found:
                raise DataError(f"{path}: no .txt, .md or .jsonl files in this directory")
            out.extend(str(p) for p in found)
        elif path.is_file():
            out.append(str(path))
        elif path.exists():
            raise DataError(f"{spec}: not a regular file or a directory (a device, a pipe or a socket is not read)")
        else:
            raise DataError(f"{spec}: no such file or directory (use hf:NAME for a Hugging Face dataset)")
    if not out:
        raise DataError("no training data given (pass files, directories or hf:NAME datasets)")
    return out


MAX_DIRECTORY_ENTRIES = 200_000  # a corpus directory larger than this is named file by file (or sharded)
MAX_TEXT_FILE_BYTES = 1 << 30  # a .txt / .md file is one document, read whole: a larger corpus is split in files
MAX_JSONL_LINE_BYTES = 64 << 20  # one JSONL record (a document or a conversation)


def _data_files(directory: Path) -> Iterator[Path]:
    """The text and JSONL files below `directory`, visiting at most MAX_DIRECTORY_ENTRIES entries (so that
    `gemma3 train /` ends in an error, not a walk over the whole file system)."""
    seen = 0
    for root, dirs, files in os.walk(directory):
        seen += len(dirs) + len(files)
        if seen > MAX_DIRECTORY_ENTRIES:
            raise DataError(f"{directory}: more than {MAX_DIRECTORY_ENTRIES:,} entries below it; pass the data "
                            "files, or a directory that holds only them")
        dirs.sort()
        for name in files:
            path = Path(root) / name
            if path.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES and path.is_file():
                yield path


def read_documents(sources: Sequence[str], text_field: str = "text") -> Iterator[Document]:
    """Every document of every source, in order. Malformed records raise `DataError` with file and line."""
    for spec in sources:
        if spec.startswith("hf:"):
            yield from _read_hf(spec[3:], text_field)
            continue
        path = Path(spec)
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _read_jsonl(path, text_field)
        else:
            try:
                with path.open("rb") as f:
                    raw = f.read(MAX_TEXT_FILE_BYTES + 1)  # bounded even if the file grows while it is read
                if len(raw) > MAX_TEXT_FILE_BYTES:
                    raise DataError(f"{path}: over {MAX_TEXT_FILE_BYTES:,} bytes; a text file is one document, read "
                                    "whole: split the corpus into several files (or JSONL records)")
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror})") from None
            if text.strip():
                yield Document(text=text, where=str(path))


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_JSONL_LINE_BYTES + 1), b""), 1):
            where = f"{path}:{lineno}"
            if len(raw) > MAX_JSONL_LINE_BYTES:
                raise DataError(f"{where}: a line over {MAX_JSONL_LINE_BYTES:,} bytes (one record a line)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 (invalid byte 0x{raw[e.start]:02x} at column {e.start + 1})") \
                    from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            yield _document(record, where, text_field)


def _read_hf(spec: str, text_field: str) -> Iterator[Document]:
    try:
        import datasets
    except ModuleNotFoundError:
        raise DataError("hf: datasets need the `datasets` package (pip install 'gemma3[train]')") from None
    name, _, split = spec.partition("@")
    split = split or "train"
    path = Path(name).expanduser()
    try:
        if path.is_file():  # a single local file: pick the builder from its extension
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
                       ".txt": "text", ".arrow": "arrow"}.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"{path}: unknown dataset file type {path.suffix!r}")
            ds = datasets.load_dataset(builder, data_files=str(path), split=split)
        else:
            ds = datasets.load_dataset(name, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError)
        raise DataError(f"hf:{spec}: cannot load dataset ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for i, record in enumerate(ds):
        yield _document(record, f"hf:{spec}[{i}]", text_field)


def _document(record, where: str, text_field: str) -> Document:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    tools = record.get("tools")
    if tools is not None and (not isinstance(tools, list) or "messages" not in record and "prompt" not in record):
        raise DataError(f"{where}: 'tools' must be a list of tool declarations beside 'messages' or 'prompt'")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        return Document(messages=messages, tools=tools or None, where=where)
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str) and tools is None:
            if not completion:
                raise DataError(f"{where}: 'completion' is empty: nothing to learn")
            return Document(text=prompt, completion=completion, where=where)
        if isinstance(prompt, list) and isinstance(completion, list) and prompt and completion:
            if any(not isinstance(m, dict) or m.get("role") not in ("assistant", "model", "tool") for m in completion):
                raise DataError(f"{where}: a 'completion' list holds the model's messages (role assistant or tool)")
            return Document(messages=prompt + completion, tools=tools or None, where=where)
        raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both non-empty lists of "
                        "messages")
    text = record.get(text_field)
    if not isinstance(text, str):
        raise DataError(f"{where}: expected a '{text_field}' string, a 'messages' list or 'prompt' and 'completion'")
    return Document(text=text, where=where)


# ------------------------------------------------------------------------------------------ tokenizing
def tokenize_document(doc: Document, tokenizer) -> tuple[list[int], list[int]]:
    """(token ids, target mask). Text: ``<bos> text`` with every token but `<bos>` a target. A prompt/completion
    pair: ``<bos> prompt completion <eos>``, targets on the completion and `<eos>`. Chat: see `tokenize_chat`."""
    if doc.completion is not None:
        prompt = tokenizer.encode(doc.text, add_bos=True)
        completion = tokenizer.encode(doc.completion, add_bos=False) + [tokenizer.eos_id]
        return prompt + completion, [0] * len(prompt) + [1] * len(completion)
    if doc.text is not None:
        ids = tokenizer.encode(doc.text, add_bos=True)
        return ids, [0] + [1] * (len(ids) - 1)
    return tokenize_chat(doc.messages, tokenizer, doc.where, doc.tools)


END_OF_TURN = "<end_of_turn>"


def tokenize_chat(messages: list, tokenizer, where: str = "conversation", tools: list | None = None
                  ) -> tuple[list[int], list[int]]:
    """Tokenize a conversation segment by segment so every token knows whether the model wrote it.

    The segments come from the chat renderer itself: what a model turn adds is ``render(messages[:i+1]) -
    render(messages[:i], generation prompt)``: its answer and ``<end_of_turn>\n`` (the target is that minus the
    newline, which the model never writes), or its calls and ``<start_function_response>`` (where the server
    stops it). Each segment is tokenized alone: the model's part starts at a token boundary, as a generated
    reply does after the server's prompt.
    """
    from gemma3.text.chat import render_chat

    try:
        segments: list[tuple[str, int]] = []
        done = ""
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role in ("assistant", "model"):
                prompt = render_chat(messages[:i], add_generation_prompt=True, tools=tools)
                full = render_chat(messages[: i + 1], add_generation_prompt=False, tools=tools)
                if not (prompt.startswith(done) and full.startswith(prompt)):
                    raise DataError(f"{where}: the chat format did not render turn by turn")
                written = full[len(prompt):]
                if written.endswith(END_OF_TURN + "\n"):
                    written = written[:-1]
                segments += [(prompt[len(done):], 0), (written, 1)]
                done = prompt + written
        full = render_chat(messages, add_generation_prompt=False, tools=tools)
        if not full.startswith(done):
            raise DataError(f"{where}: the chat format did not render turn by turn")
    except DataError:
        raise
    except Gemma3Error as e:
        raise DataError(f"{where}: {e}") from None
    if not any(target for _, target in segments):
        raise DataError(f"{where}: no assistant message: nothing for the model to learn")
    segments.append((full[len(done):], 0))

    ids: list[int] = []
    mask: list[int] = []
    for text, target in segments:
        if not text:
            continue
        piece = tokenizer.encode(text, add_bos=False)
        ids += piece
        mask += [target] * len(piece)
    return ids, mask


def _tokenizer_fingerprint(tokenizer) -> str:
    probe = "Fingerprint: <start_of_turn>user\n  tabs\tand ünïcödé 123<end_of_turn>"
    return hashlib.sha256(json.dumps([len(tokenizer), tokenizer.encode(probe)]).encode()).hexdigest()[:16]


def data_fingerprint(sources: Sequence[str], tokenizer, text_field: str) -> str:
    """Identifies a token file: the sources (path, size, mtime; hf specs by name), the tokenizer and the field."""
    parts = [TOKEN_FILE_VERSION, text_field, _tokenizer_fingerprint(tokenizer)]
    for spec in sources:
        if spec.startswith("hf:"):
            parts.append(spec)
        else:
            st = os.stat(spec)
            parts.append([os.path.abspath(spec), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


# ------------------------------------------------------------------------------------------ token file
class TokenFile:
    """A tokenized corpus on disk, memory-mapped: ``tokens`` (uint32), ``mask`` (uint8), ``offsets`` (int64,
    document d is tokens[offsets[d]:offsets[d+1]]) and a JSON header (`meta`)."""

    def __init__(self, prefix: Path):
        self.prefix = Path(prefix)
        self.meta = json.loads(self.prefix.with_suffix(".json").read_text(encoding="utf-8"))
        n = self.meta["num_tokens"]
        self.tokens = np.memmap(self.prefix.with_suffix(".tokens"), dtype=np.uint32, mode="r", shape=(n,))
        self.mask = np.memmap(self.prefix.with_suffix(".mask"), dtype=np.uint8, mode="r", shape=(n,))
        self.offsets = np.load(self.prefix.with_suffix(".offsets.npy"))

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def build(cls, sources: Sequence[str], tokenizer, cache_dir: str | Path, text_field: str = "text",
              progress: bool = True) -> "TokenFile":
        """Tokenize `sources` into `cache_dir` unless a token file with the same fingerprint is already there.

        Written under temporary names and renamed, header last, so a run killed mid-way leaves no file
        that looks complete."""
        sources = expand_sources(sources)
        fingerprint = data_fingerprint(sources, tokenizer, text_field)
        cache_dir = Path(cache_dir)
        prefix = cache_dir / f"tokens-{fingerprint}"
        if prefix.with_suffix(".json").is_file():
            return cls(prefix)
        cache_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp(cache_dir, f"{prefix.name}.*.tmp-*")  # what a killed tokenization left behind
        tmp = {s: temp_path(prefix.with_suffix(s)) for s in (".tokens", ".mask", ".offsets.npy", ".json")}
        try:
            cls._write(sources, tokenizer, text_field, progress, prefix, tmp, fingerprint)
        finally:
            for p in tmp.values():  # renamed into place on success; an error or a kill leaves nothing behind
                p.unlink(missing_ok=True)
        return cls(prefix)

    @staticmethod
    def _write(sources: list[str], tokenizer, text_field: str, progress: bool, prefix: Path, tmp: dict[str, Path],
               fingerprint: str) -> None:
        offsets = [0]
        max_id = 0
        kinds: set[str] = set()
        bar = _progress(read_documents(sources, text_field), progress, "tokenizing")
        with open(tmp[".tokens"], "wb") as ft, open(tmp[".mask"], "wb") as fm:
            for doc in bar:
                # masked documents (chat, prompt/completion) are packed whole; text is streamed
                kinds.add("text" if doc.messages is None and doc.completion is None else "chat")
                if len(kinds) > 1:
                    raise DataError(f"{doc.where}: mixes plain-text records with chat or prompt/completion records "
                                    "in one dataset")
                ids, mask = tokenize_document(doc, tokenizer)
                max_id = max(max_id, max(ids, default=0))
                ft.write(np.asarray(ids, dtype=np.uint32).tobytes())
                fm.write(np.asarray(mask, dtype=np.uint8).tobytes())
                offsets.append(offsets[-1] + len(ids))
                if hasattr(bar, "set_postfix_str"):
                    bar.set_postfix_str(f"{offsets[-1]:,} tokens", refresh=False)
            for f in (ft, fm):
                f.flush()
                os.fsync(f.fileno())
        if len(offsets) == 1 or offsets[-1] == 0:
            raise DataError(f"the dataset is empty: no documents with text in {', '.join(sources)}")
        with open(tmp[".offsets.npy"], "wb") as f:
            np.save(f, np.asarray(offsets, dtype=np.int64))
        meta = {"version": TOKEN_FILE_VERSION, "kind": kinds.pop(), "num_tokens": offsets[-1],
                "num_docs": len(offsets) - 1, "max_id": max_id, "sources": list(sources), "text_field": text_field,
                "fingerprint": fingerprint}
        tmp[".json"].write_text(json.dumps(meta, indent=1), encoding="utf-8")
        for suffix in (".tokens", ".mask", ".offsets.npy", ".json"):  # header last: it marks completeness
            os.replace(tmp[suffix], prefix.with_suffix(suffix))


def _progress(items: Iterable, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="doc", file=sys.stderr, delay=0.5)


# ------------------------------------------------------------------------------------ split and packing
def split_documents(num_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train doc ids, held-out doc ids): a seeded choice of ceil(fraction · n) whole documents, at least one.
    With a single document both lists hold it and `PackedDataset` splits its tokens instead."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val fraction must be in [0, 1), got {val_fraction}")
    docs = np.arange(num_docs)
    if val_fraction == 0:
        return docs, docs[:0]
    if num_docs == 1:
        return docs, docs
    n_val = min(num_docs - 1, max(1, int(np.ceil(val_fraction * num_docs))))
    perm = np.random.default_rng(seed).permutation(num_docs)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class Example(NamedTuple):
    """One packed sequence: token ids, targets (-100 where there is none) and positions (restarting at 0 where a
    packed conversation starts; -1 on padding). All (seq_len,) int64, or (batch, seq_len) once collated."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length `Example`s over some documents of a `TokenFile` (see module docstring).

    `part` selects, when the file holds a single document, which side of its token-level split to use:
    the first (1 - val_fraction) of its tokens for "train", the rest for "val".
    """

    def __init__(self, tokens: TokenFile, docs: np.ndarray, seq_len: int, pad_id: int = 0,
                 mode: str | None = None, part: str = "train", val_fraction: float = 0.0):
        if seq_len < 2:
            raise DataError(f"sequence length must be at least 2, got {seq_len}")
        self.file, self.seq_len, self.pad_id = tokens, seq_len, pad_id
        self.mode = mode or ("whole" if tokens.kind == "chat" else "stream")
        starts, ends = tokens.offsets[docs], tokens.offsets[docs + 1]
        if tokens.num_docs == 1 and val_fraction > 0:
            cut = starts[0] + int((ends[0] - starts[0]) * (1 - val_fraction))
            starts, ends = (starts, np.minimum(ends, cut)) if part == "train" else (np.maximum(starts, cut), ends)
        self.ranges = np.stack([starts, ends], axis=1).astype(np.int64)  # (docs, 2) token ranges in the file
        if self.mode == "stream":
            lengths = self.ranges[:, 1] - self.ranges[:, 0]
            self.cum = np.concatenate([[0], np.cumsum(lengths)])  # stream offset where each range starts
            total = int(self.cum[-1])
            # windows of seq_len tokens, stride seq_len - 1: the last token of one window is the first input of
            # the next, so every token after the first is predicted exactly once
            self.num_sequences = max(0, (total - 1) // (seq_len - 1)) if total >= seq_len else 0
        elif self.mode == "whole":
            self.bins = self._pack_whole()
            self.num_sequences = len(self.bins)
        else:
            raise DataError(f"unknown packing mode {mode!r} (stream or whole)")

    def _pack_whole(self) -> list[list[int]]:
        """First-fit packing of whole documents into sequences of at most seq_len tokens."""
        bins: list[list[int]] = []
        room: list[int] = []
        for i, (s, e) in enumerate(self.ranges):
            n = int(e - s)
            if n > self.seq_len:
                raise DataError(f"document {self._where(i)} has {n} tokens, longer than the sequence length "
                                f"{self.seq_len}; raise --seq-len (up to the model's context) or shorten it")
            for b, free in enumerate(room):
                if n <= free:
                    bins[b].append(i)
                    room[b] -= n
                    break
            else:
                bins.append([i])
                room.append(self.seq_len - n)
        return bins

    def _where(self, range_index: int) -> str:
        doc = int(np.searchsorted(self.file.offsets, self.ranges[range_index, 0], side="right")) - 1
        return f"#{doc} (0-based, in {', '.join(self.file.meta['sources'])})"

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.num_sequences:
            raise IndexError(index)
        if self.mode == "stream":  # one stream: documents after one another see their predecessors, as in pretraining
            ids, mask = self._stream_slice(index * (self.seq_len - 1), self.seq_len)
            positions = np.arange(self.seq_len, dtype=np.int64)
        else:
            ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
            mask = np.zeros(self.seq_len, dtype=np.int64)
            positions = np.full(self.seq_len, -1, dtype=np.int64)
            at = 0
            for r in self.bins[index]:
                s, e = self.ranges[r]
                ids[at:at + e - s] = self.file.tokens[s:e]
                mask[at:at + e - s] = self.file.mask[s:e]
                positions[at:at + e - s] = np.arange(e - s)
                at += e - s
        ids_t = torch.from_numpy(ids)
        labels = torch.where(torch.from_numpy(mask).bool(), ids_t, torch.full_like(ids_t, IGNORE_INDEX))
        return Example(ids_t, labels, torch.from_numpy(positions))

    def _stream_slice(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = [], []
        r = int(np.searchsorted(self.cum, start, side="right")) - 1
        while length > 0:
            s, e = self.ranges[r]
            s += start - self.cum[r]
            take = min(length, e - s)
            ids.append(self.file.tokens[s:s + take])
            mask.append(self.file.mask[s:s + take])
            length -= take
            start += take
            r += 1
        return np.concatenate(ids).astype(np.int64), np.concatenate(mask).astype(np.int64)


def unigram_loss(tokens: TokenFile, val: PackedDataset) -> float:
    """Entropy (nats/token) of the held-out targets' own unigram distribution: the lowest loss any model that
    ignores context could reach on them, even one fitted to the held-out text itself. A trained model's
    held-out loss must end well below it."""
    ids = [tokens.tokens[s:e][tokens.mask[s:e].astype(bool)] for s, e in val.ranges]
    ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint32)
    if len(ids) == 0:
        return float("nan")
    _, counts = np.unique(ids, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------------------------- batches
def global_batch_indices(step: int, global_batch: int, num_sequences: int, seed: int) -> np.ndarray:
    """Indices of the sequences that optimizer step `step` consumes, for all ranks together.

    Sequence ordinal n (counted over the whole run) is element n % N of the epoch's seeded permutation, epoch
    n // N. A pure function of (step, seed): resuming needs only the step, and the same global batch gives
    the same sequences whatever the number of processes."""
    ordinals = np.arange(step * global_batch, (step + 1) * global_batch)
    out = np.empty(global_batch, dtype=np.int64)
    for epoch in np.unique(ordinals // num_sequences):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_sequences)
        sel = ordinals // num_sequences == epoch
        out[sel] = perm[ordinals[sel] % num_sequences]
    return out


def collate(dataset: PackedDataset, indices: Iterable[int]) -> Example:
    examples = [dataset[int(i)] for i in indices]
    return Example(*(torch.stack(parts) for parts in zip(*examples)))
