"""Tokenizer: the same ids as the official Gemma 3 tokenizer.json from every source (the json itself, the real
270M GGUF, a SentencePiece tokenizer.model), a byte-identical rebuild, decoding, BOS once, and bad input.

The reference is HF `tokenizers` running the official tokenizer.json. Each tokenizer is built once per module.
A GGUF or tokenizer.model runs on our C BPE engine (gemma3.text.native_bpe) by default; "gguf_hf" / "gguf_cached" are
the same GGUF on the HF `tokenizers` engine (the fallback where nothing compiles), built into an empty cache and read
back."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from hypothesis import given
from hypothesis import strategies as st

from gemma3.errors import CheckpointError, Gemma3Error
from gemma3.text.tokenizer import Tokenizer
from gemma3.text.vocab import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED
from gemma3.weights.gguf.reader import read_gguf_metadata
from tokenizer_corpus import corpus

OFFICIAL_SHA256 = "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795"
CORPUS = corpus(seed=0)
SOURCES = ["json", "gguf", "gguf_hf", "gguf_cached", "sentencepiece"]


# --- a tokenizer.model written from the GGUF arrays --------------------------------------------------------------
# No Gemma 3 tokenizer.model is available offline, so the test writes one: the GGUF vocabulary with llama.cpp's
# two edits undone (`▁` for spaces, 0.0 for non-NORMAL scores) is exactly SentencePiece's piece list.

def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def sentencepiece_model(pieces: list[str], scores, types, model_type: int = 2) -> bytes:
    """A SentencePiece ModelProto: pieces (1), trainer_spec (2) with model_type and byte_fallback, and a
    normalizer_spec (3: identity, no dummy prefix, keep whitespace) that the reader must skip. The
    `sentencepiece` library loads the result and encodes as the official tokenizer does."""
    body = bytearray()
    for piece, score, kind in zip(pieces, scores, types):
        message = _field(1, piece.encode("utf-8")) + _varint(2 << 3 | 5) + struct.pack("<f", score)
        if kind != NORMAL:  # proto2 default, left out as SentencePiece's writer does
            message += _varint(3 << 3) + _varint(int(kind))
        body += _field(1, message)
    body += _field(2, _varint(3 << 3) + _varint(model_type) + _field(2, b"gemma3.model") + _varint(35 << 3) + b"\x01")
    body += _field(3, _field(1, b"identity") + _varint(3 << 3) + b"\x00" + _varint(4 << 3) + b"\x00")
    return bytes(body)


def sentencepiece_pieces(data: bytes) -> list[str]:
    """The piece texts of a ModelProto in file order, parsed here on their own (not by the reader under test):
    each field 1 of the message is a piece, whose field 1 is its text. Only for bytes the reader accepted."""
    def fields(buf: bytes):
        pos = 0
        while pos < len(buf):
            key, pos = _read_varint(buf, pos)
            wire = key & 7
            if wire == 0:
                value, pos = _read_varint(buf, pos)
            elif wire in (1, 5):
                size = 8 if wire == 1 else 4
                value, pos = buf[pos:pos + size], pos + size
            else:  # 2: the reader rejected every other wire type
                size, pos = _read_varint(buf, pos)
                value, pos = buf[pos:pos + size], pos + size
            yield key >> 3, wire, value

    return [[bytes(v).decode("utf-8") for f, w, v in fields(piece) if f == 1 and w == 2][-1]  # the last one counts
            for number, wire, piece in fields(data) if number == 1 and wire == 2]


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """A 16-piece vocabulary with the tokens a Gemma 3 tokenizer must have."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "▁▁", "<0x41>",
              "a", "b", "▁", "ab", "▁a", "▁ab", "ba", "bab"]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, CONTROL, CONTROL, USER_DEFINED, BYTE] + [NORMAL] * 8
    scores = [0.0] * 8 + [-float(r) for r in range(8)]
    return pieces, scores, types


TINY_MODEL = sentencepiece_model(*tiny_vocab())


def _edited(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position] = value
    return bytes(out)


# --- fixtures: one build per source --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(official_tokenizer) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(official_tokenizer / "tokenizer.json"))


@pytest.fixture(scope="module")
def gguf_metadata(gguf_path) -> dict:
    return read_gguf_metadata(gguf_path)


@pytest.fixture(scope="module")
def sentencepiece_file(tmp_path_factory, gguf_metadata) -> Path:
    types = gguf_metadata["tokenizer.ggml.token_type"].copy()
    pieces = [p.replace(" ", "▁") for p in gguf_metadata["tokenizer.ggml.tokens"]]
    types[pieces.index("<unk>")] = UNKNOWN  # llama.cpp stores it as CONTROL; SentencePiece as UNKNOWN
    scores = np.where(types == NORMAL, gguf_metadata["tokenizer.ggml.scores"], 0.0)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(sentencepiece_model(pieces, scores, types))
    return path


@pytest.fixture(scope="module")
def built(official_tokenizer, gguf_path, sentencepiece_file, tmp_path_factory) -> dict[str, Tokenizer]:
    """Every source; "gguf_hf" is rebuilt into an empty cache, "gguf_cached" is the same GGUF read back from it.
    The native engine keeps no cache (it derives the merges in ~0.2 s)."""
    cache = tmp_path_factory.mktemp("tokenizer_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEMMA3_TOKENIZER_CACHE", str(cache))
        native = Tokenizer.from_gguf(gguf_path)
        sentencepiece = Tokenizer.from_sentencepiece(sentencepiece_file)
        assert not list(cache.iterdir())
        rebuilt = Tokenizer.from_gguf(gguf_path, engine="hf")
        assert len(list(cache.iterdir())) == 1
        cached = Tokenizer.from_gguf(gguf_path, engine="hf")
    built = {"json": Tokenizer.from_file(official_tokenizer / "tokenizer.json"), "gguf": native, "gguf_hf": rebuilt,
             "gguf_cached": cached, "sentencepiece": sentencepiece}
    assert {name: t.engine for name, t in built.items()} == {
        "json": "hf", "gguf": "native", "gguf_hf": "hf", "gguf_cached": "hf", "sentencepiece": "native"}
    return built


# --- exactness -------------------------------------------------------------------------------------------------

def test_corpus_covers_the_hard_cases():
    assert len(CORPUS) >= 2000 and len(set(CORPUS)) > 1900
    assert corpus(seed=0) == CORPUS  # seeded
    joined = "".join(CORPUS)
    for needle in [" " * 32, " " * 64, "\t" * 32, "\n" * 32, "    return", "\u200d", "<start_of_turn>", "<bos>",
                   "\x00", "天", "👨‍👩‍👧‍👦", "Привет"]:
        assert needle in joined, needle
    assert max(map(len, CORPUS)) > 2000


@pytest.mark.parametrize("source", SOURCES)
def test_ids_match_the_official_tokenizer(built, reference, source):
    tokenizer = built[source]
    expected = [e.ids for e in reference.encode_batch(CORPUS, add_special_tokens=False)]
    got = tokenizer.encode_batch(CORPUS, add_bos=False)
    bad = [(text, want, have) for text, want, have in zip(CORPUS, expected, got) if want != have]
    assert not bad, f"{len(bad)}/{len(CORPUS)} strings differ, first: {bad[0]!r}"
    # One at a time, with BOS: the official post-processor prepends <bos>; ours does too (once).
    for text in CORPUS[::7]:
        if not text.startswith("<bos>"):
            assert tokenizer.encode(text) == reference.encode(text).ids, text


@pytest.mark.parametrize("source", ["gguf", "gguf_hf", "gguf_cached", "sentencepiece"])
def test_rebuild_is_byte_identical_to_the_official_file(built, tmp_path, source):
    out = tmp_path / "tokenizer.json"
    built[source].save(out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == OFFICIAL_SHA256


@given(text=st.text(max_size=80))
def test_any_text_matches_the_official_tokenizer(built, reference, text):
    assert built["gguf"].encode(text, add_bos=False) == reference.encode(text, add_special_tokens=False).ids


# Pieces that make the engines' hard paths meet: added tokens next to and inside text (leftmost-longest
# matching, `<unused1>` vs `<unused12>`), runs of spaces (user-defined `▁` runs ranked first), `▁` itself,
# byte fallback, and partial special-token text.
FRAGMENTS = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<unused1>", "<unused12>", "<unused", "start_of_turn>",
             "<", ">", " ", "  ", "    ", "\n", "\n\n", "\t", "\u2581", "\u2581\u2581", "a", "the", "The", "return",
             "def", "ing", "天", "👍🏽", "\U000e0061", "\x00", "\x7f", "é", "e\u0301", "<0x41>", "12", "3.5", "-", "_"]


@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=40))
def test_fragment_soups_match_the_official_tokenizer(built, reference, parts):
    text = "".join(parts)
    assert built["gguf"].encode(text, add_bos=False) == reference.encode(text, add_special_tokens=False).ids


def test_native_merges_are_the_python_derivation(built, gguf_metadata):
    """bpe.c's split search + `rank_merges` give the merge list `_bpe_merges` (the HF engine's, in Python) gives,
    in the same order."""
    from gemma3.text.hf_engine import _bpe_merges, _checked

    pieces = [p.replace(" ", "▁") for p in gguf_metadata["tokenizer.ggml.tokens"]]
    scores, types, vocab = _checked(pieces, gguf_metadata["tokenizer.ggml.scores"],
                                    gguf_metadata["tokenizer.ggml.token_type"], "gguf")
    expected = _bpe_merges(pieces, vocab, np.where(types == NORMAL, scores, 0.0))
    np.testing.assert_array_equal(built["gguf"]._engine.merges(), expected)
    assert expected.shape == (514_906, 2)


def test_engine_choice(gguf_metadata, monkeypatch):
    from gemma3.text import native_bpe as bpe

    with pytest.raises(ValueError, match="engine must be one of"):
        Tokenizer.from_gguf_metadata(gguf_metadata, engine="rust")
    monkeypatch.setattr(bpe, "library", lambda: None)  # as where nothing compiles
    with pytest.raises(Gemma3Error, match="native tokenizer engine is unavailable"):
        Tokenizer.from_gguf_metadata(gguf_metadata, engine="native")
    assert Tokenizer.from_gguf_metadata(gguf_metadata).engine == "hf"  # auto falls back


@pytest.mark.parametrize("source", ["gguf", "json", "gguf_hf"])
def test_text_that_is_not_unicode(built, source):
    """A lone surrogate (what `open(..., errors="surrogateescape")` makes of bad bytes) cannot be UTF-8."""
    for encode in (lambda text: built[source].encode(text), lambda text: built[source].encode_batch(["ok", text])[1]):
        with pytest.raises(Gemma3Error) as e:
            encode("ab\ud800c")
        assert str(e.value) == "text to tokenize is not valid Unicode (a lone surrogate at index 2)"
    with pytest.raises(TypeError):  # not text at all: a caller's mistake, said as Python says it
        built[source].encode(b"bytes")


def test_whitespace_runs_and_indentation(built):
    """The two places where merges ranked by id (transformers' GGUF loader) or by raw GGUF score go wrong."""
    tok = built["gguf"]
    assert tok.encode(" " * 32, add_bos=False) == [167, 236743]  # the 31-space piece, then `▁`
    assert tok.encode("    return", add_bos=False) == [tok.token_to_id("▁▁▁▁"), tok.token_to_id("return")]


# --- decoding --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["json", "gguf"])
def test_decode_round_trip(built, source):
    tok = built[source]
    # `▁` in the input is the one thing that cannot survive: the decoder turns every `▁` into a space.
    texts = [t for t in CORPUS if "\u2581" not in t]
    assert all(tok.decode(ids) == t for t, ids in zip(texts, tok.encode_batch(texts, add_bos=False)))
    assert tok.decode(tok.encode("\u2581x", add_bos=False)) == " x"


def test_decode_bytes_is_what_decode_decodes(built, reference):
    tok = built["gguf"]
    for ids in tok.encode_batch(CORPUS[::3]):
        assert tok.decode_bytes(ids).decode("utf-8") == tok.decode(ids) == reference.decode(ids,
                                                                                      skip_special_tokens=False)


def test_token_bytes(built):
    tok = built["gguf"]
    assert tok.token_bytes(tok.token_to_id("▁")) == b" "
    assert tok.token_bytes(tok.token_to_id("▁▁▁▁")) == b"    "
    assert tok.token_bytes(tok.token_to_id("<0x41>")) == b"A"
    assert tok.token_bytes(tok.token_to_id("<0xE2>")) == b"\xe2"
    assert tok.token_bytes(105) == b"<start_of_turn>"
    assert tok.token_bytes(107) == b"\n"
    # A rare character goes through byte fallback: each token is one byte, none of them valid UTF-8 alone.
    ids = tok.encode("\U000e0100", add_bos=False)
    assert [tok.token_bytes(i) for i in ids] == [bytes([b]) for b in "\U000e0100".encode()]
    assert tok.decode(ids[:2]) == "\ufffd\ufffd"  # what a streamer must not print


def test_skip_special_tokens(built):
    tok = built["gguf"]
    ids = tok.encode("<start_of_turn>user\nHi<end_of_turn>\n<unused0>")
    assert tok.decode(ids) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<unused0>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi\n<unused0>"  # <unusedN> are not special


def test_out_of_vocabulary_ids_are_rejected(built):
    tok = built["json"]
    for bad in (-1, tok.vocab_size, 2**40):
        with pytest.raises(Gemma3Error, match="outside the vocabulary"):
            tok.decode([2, bad])
        with pytest.raises(Gemma3Error, match="outside the vocabulary"):
            tok.token_bytes(bad)


# --- BOS and special ids ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", SOURCES)
def test_special_ids(built, source):
    tok = built[source]
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.start_of_turn_id, tok.end_of_turn_id) == (0, 1, 2, 105, 106)
    assert tok.vocab_size == len(tok) == 262_145  # 262 144 pieces + <image_soft_token>
    assert tok.token_to_id("<image_soft_token>") == 262_144 and tok.token_to_id("no such piece") is None
    assert tok.special_ids == {0, 1, 2, 3, 105, 106, 255_999, 256_000, 262_144}
    assert [tok.id_to_piece(i) for i in (3, 107, 138, 238, 236_743)] == ["<unk>", "\n", "▁▁", "<0x00>", "▁"]


def test_bos_exactly_once(built, reference):
    tok = built["gguf"]
    assert tok.encode("") == [2] and tok.encode("", add_bos=False) == []
    assert tok.encode("Hi") == [2, *tok.encode("Hi", add_bos=False)]
    # The official tokenizer would give [2, 2, ...] here (pitfall 19); we keep the one the text spells.
    assert reference.encode("<bos>Hi").ids[:2] == [2, 2]
    assert tok.encode("<bos>Hi") == tok.encode("<bos>Hi", add_bos=False) == [2, *tok.encode("Hi", add_bos=False)]
    assert tok.encode_batch(["<bos>Hi", "Hi", ""]) == [tok.encode("<bos>Hi"), tok.encode("Hi"), [2]]
    # Only a leading <bos> counts; one later in the text is ordinary content.
    assert tok.encode(" <bos>")[:2] == [2, tok.token_to_id("▁")]


# --- sources and bad input ------------------------------------------------------------------------------------------

def test_from_dir_and_save(tmp_path):
    """A directory with only tokenizer.model uses it; `save` then adds tokenizer.json, which wins."""
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model(*tiny_vocab()))
    from_model = Tokenizer.from_dir(tmp_path)
    assert from_model.source.endswith("tokenizer.model") and not list(tmp_path.glob("*.tmp"))
    from_model.save(tmp_path / "tokenizer.json")
    from_json = Tokenizer.from_dir(tmp_path)
    assert from_json.source.endswith("tokenizer.json")
    for text in ["abab", " ab  A<bos>", "bab\n"]:
        assert from_json.encode(text) == from_model.encode(text)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path / "empty")


def test_tiny_sentencepiece_model(tmp_path):
    """A vocabulary small enough to follow by hand: merges a+b (score -3) first, then b+ab (-7) gives `bab`;
    `ab ab` leaves nothing to merge across the two `ab`s."""
    path = tmp_path / "tokenizer.model"
    path.write_bytes(sentencepiece_model(*tiny_vocab()))
    tok = Tokenizer.from_sentencepiece(path)
    assert tok.encode("bab", add_bos=False) == [15]
    assert tok.encode("abab", add_bos=False) == [11, 11]
    assert tok.encode(" ab  ab", add_bos=False) == [13, 6, 11]  # ▁ab + ▁▁ (user-defined) + ab
    assert tok.encode("A", add_bos=False) == [7]  # byte fallback
    assert tok.decode(tok.encode(" ab  A")) == "<bos> ab  A"


def test_bad_files(tmp_path):
    garbage = tmp_path / "tokenizer.json"
    garbage.write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_file(garbage)
    with pytest.raises(CheckpointError, match="cannot load"):
        Tokenizer.from_file(tmp_path / "missing.json")
    pieces, scores, types = tiny_vocab()
    model = tmp_path / "tokenizer.model"
    model.write_bytes(sentencepiece_model(pieces, scores, types, model_type=1))
    with pytest.raises(CheckpointError, match="not BPE"):
        Tokenizer.from_sentencepiece(model)
    good = sentencepiece_model(pieces, scores, types)
    for cut in (1, 7, len(good) // 2, len(good) - 1):
        model.write_bytes(good[:cut])
        with pytest.raises(CheckpointError, match=str(model)):
            Tokenizer.from_sentencepiece(model)
    with pytest.raises(CheckpointError, match="cannot read"):
        Tokenizer.from_sentencepiece(tmp_path / "missing.model")
    pieces[2] = "<not_bos>"
    model.write_bytes(sentencepiece_model(pieces, scores, types))
    with pytest.raises(CheckpointError, match="no <bos> token"):
        Tokenizer.from_sentencepiece(model)


@given(data=st.one_of(st.binary(max_size=300),  # junk, and a valid file with a few bytes changed
                      st.lists(st.tuples(st.integers(0, len(TINY_MODEL) - 1), st.integers(0, 255)), min_size=1,
                               max_size=4).map(lambda edits: _edited(TINY_MODEL, edits))))
def test_corrupt_tokenizer_model_fails_cleanly(tmp_path_factory, data):
    """Whatever the bytes, the reader either builds a working tokenizer of the pieces in the file, or raises a
    CheckpointError of one line that names the file."""
    path = tmp_path_factory.mktemp("fuzz") / "tokenizer.model"
    path.write_bytes(data)
    try:
        tok = Tokenizer.from_sentencepiece(path)
    except CheckpointError as e:
        message = str(e)
        assert "\n" not in message and "\r" not in message and message.startswith(f"{path}: "), message
        return
    pieces = sentencepiece_pieces(data)
    # every piece at its index, then <image_soft_token> at the next id unless the file has one (as the official file)
    added = [] if "<image_soft_token>" in pieces else ["<image_soft_token>"]
    assert tok.vocab_size == len(tok) == len(pieces) + len(added)
    assert [tok.id_to_piece(i) for i in range(tok.vocab_size)] == pieces + added
    assert tok.encode("", add_bos=True) == [tok.bos_id] and tok.id_to_piece(tok.bos_id) == "<bos>"
    for piece in set(pieces[:64]):  # a piece that is a plain word (no special or byte piece) decodes to itself
        if piece.isascii() and piece.isalpha():
            assert tok.decode([pieces.index(piece)]) == piece



def test_score_with_a_64_bit_wire_type_is_a_checkpoint_error(tmp_path):
    """Field 0 varints, then a piece whose score (field 2) is 8 bytes (wire type 1), not a 4-byte float."""
    path = tmp_path / "tokenizer.model"
    path.write_bytes(bytes(84) + bytes([0x0A, 0x09, 0x11]) + bytes(8))
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_sentencepiece(path)
    assert str(path) in str(e.value) and "pieces.score" in str(e.value) and "\n" not in str(e.value)


# A value of each wire type: varint, 64-bit, length-delimited, 32-bit.
WIRE_VALUES = {0: _varint(1), 1: bytes(8), 2: _varint(1) + b"a", 5: bytes(4)}


@pytest.mark.parametrize(("field", "name", "wire"), [
    (field, name, wire) for field, name, right in [(1, "piece", 2), (2, "score", 5), (3, "type", 0)]
    for wire in (0, 1, 2, 5) if wire != right])
def test_piece_field_with_the_wrong_wire_type(tmp_path, field, name, wire):
    """Each of a piece's fields in each wire type it must not have: a one-line error naming the field."""
    message = _field(1, b"a") + _varint(2 << 3 | 5) + struct.pack("<f", 0.0)
    message += _varint(field << 3 | wire) + WIRE_VALUES[wire]
    path = tmp_path / "tokenizer.model"
    path.write_bytes(TINY_MODEL + _field(1, message))
    with pytest.raises(CheckpointError, match=f"pieces\\.{name}, field {field}") as e:
        Tokenizer.from_sentencepiece(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("wire", [3, 4, 6, 7])
def test_invalid_wire_types(tmp_path, wire):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(TINY_MODEL + _varint(9 << 3 | wire) + bytes(8))
    with pytest.raises(CheckpointError, match=f"invalid wire type {wire}"):
        Tokenizer.from_sentencepiece(path)


def test_unknown_fields_of_every_wire_type_are_skipped(tmp_path):
    (tmp_path / "tiny.model").write_bytes(TINY_MODEL)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"".join(_varint(99 << 3 | wire) + value for wire, value in WIRE_VALUES.items()) + TINY_MODEL)
    tiny = Tokenizer.from_sentencepiece(tmp_path / "tiny.model")
    assert Tokenizer.from_sentencepiece(path).to_json() == tiny.to_json()


@pytest.mark.parametrize("engine", ["auto", "hf"])
def test_bad_gguf_metadata(engine):
    pieces, scores, types = tiny_vocab()
    good = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
            "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
            "tokenizer.ggml.token_type": np.array(types, dtype=np.int32)}
    assert Tokenizer.from_gguf_metadata(good, engine=engine).encode("ab ab", add_bos=False) == [11, 13]
    cases = {"'gpt2'": {"tokenizer.ggml.model": "gpt2"},
             "no tokenizer.ggml.scores": {"tokenizer.ggml.scores": None},
             "disagree in length": {"tokenizer.ggml.token_type": np.array(types[:-1], dtype=np.int32)},
             "unknown token type": {"tokenizer.ggml.token_type": np.array(types[:-1] + [9], dtype=np.int32)},
             "duplicate pieces": {"tokenizer.ggml.tokens": pieces[:-1] + ["a"]},
             "not a list of strings": {"tokenizer.ggml.tokens": pieces[:-1] + [b"bab"]},
             "not numbers": {"tokenizer.ggml.scores": ["high"] * len(pieces)},
             "no <start_of_turn> token": {"tokenizer.ggml.tokens": pieces[:4] + ["<sot>"] + pieces[5:]}}
    for message, change in cases.items():
        metadata = {**good, **change}
        metadata = {k: v for k, v in metadata.items() if v is not None}
        with pytest.raises(CheckpointError, match=f"model.gguf: .*{message}"):
            Tokenizer.from_gguf_metadata(metadata, source="model.gguf", engine=engine)


def test_tokenizer_cache_is_used_only_when_it_is_ours_and_sound(gguf_metadata, tmp_path, monkeypatch):
    """A rebuilt tokenizer is kept under a hash of what it was built from; a cached file that is corrupt, names
    other pieces, or is writable by others is not used (it is rebuilt and replaced); GEMMA3_TOKENIZER_CACHE=0
    writes nothing. (Only the HF engine keeps one: the native engine derives the merges in ~0.2 s.)"""
    import os

    from gemma3.text import hf_engine as tokenizer_module

    monkeypatch.setenv("GEMMA3_TOKENIZER_CACHE", str(tmp_path))
    builds = []  # each time the merges are derived (the slow part the cache saves)
    real_derive = tokenizer_module._bpe_merges
    monkeypatch.setattr(tokenizer_module, "_bpe_merges", lambda *a: builds.append(1) or real_derive(*a))
    stale = tmp_path / ("0" * 32 + "." + "1" * 16 + ".json")  # what the cache kept before (format 1)
    stale.write_text("{}")
    os.chmod(stale, 0o600)
    first = Tokenizer.from_gguf_metadata(gguf_metadata, engine="hf")
    assert not stale.exists()  # removed once the new entry is written
    (cached,) = tmp_path.iterdir()
    assert builds == [1] and oct(cached.stat().st_mode & 0o777) == "0o600"
    second = Tokenizer.from_gguf_metadata(gguf_metadata, engine="hf")
    assert builds == [1] and second.encode("Hello  world\n\tdef") == first.encode("Hello  world\n\tdef")

    for spoil in ("corrupt", "ids out of range", "a pickle", "world-writable"):
        (cached,) = tmp_path.iterdir()
        if spoil == "corrupt":
            cached.write_bytes(b"\x93NUMPY garbage")
        elif spoil in ("ids out of range", "a pickle"):
            # a well-formed file under a matching content hash, holding what must not be used
            import hashlib
            import io

            buffer = io.BytesIO()
            if spoil == "a pickle":
                np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
            else:
                np.save(buffer, np.array([[0, len(gguf_metadata["tokenizer.ggml.tokens"])]], dtype=np.int32))
            data = buffer.getvalue()
            cached.unlink()
            cached = tmp_path / f"{cached.name.split('.')[0]}.{hashlib.sha256(data).hexdigest()[:16]}.npy"
            cached.write_bytes(data)
            os.chmod(cached, 0o600)
        else:
            os.chmod(cached, 0o666)
        again = Tokenizer.from_gguf_metadata(gguf_metadata, engine="hf")
        assert again.encode("Hello world") == first.encode("Hello world")
        assert len(builds) >= 2, spoil
        builds.clear()
        builds.append(1)

    monkeypatch.setenv("GEMMA3_TOKENIZER_CACHE", "0")
    cached.unlink()
    Tokenizer.from_gguf_metadata(gguf_metadata, engine="hf")
    assert not list(tmp_path.iterdir())
