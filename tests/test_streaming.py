"""Streaming detokenizer on the official Gemma 3 tokenizer: deltas never split a character, concatenate to the
full decode, and stop strings (even across tokens) end the stream with only the text before them."""

from __future__ import annotations

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma3.errors import Gemma3Error
from gemma3.generation.finish import stop_reason
from gemma3.text.streaming import TextStreamer, find_stop, partial_stop_length

RARE_CJK = "丣乛亶"  # not in the vocabulary: three <0xNN> byte tokens each
TEXTS = [
    "Hello, world! How are you today?",
    "Family: 👨‍👩‍👧‍👦, flags: 🇯🇵🇫🇷, skin tone: 👍🏽, plain: 😀🎉",
    "日本語のテキストと中文文本，还有한국어.",
    f"Rare ideographs {RARE_CJK} need byte fallback.",
    "Mixed: naïve café 😀 丣 \x00 tab\tand   spaces\n\nnew lines",
]


class OfficialTokenizer:
    """The adapter the streamer expects: `decode(ids) -> str`, here over HF `tokenizers`."""

    def __init__(self, path):
        self._tok = tokenizers.Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def pieces(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens


@pytest.fixture(scope="module")
def tok(official_tokenizer):
    return OfficialTokenizer(official_tokenizer / "tokenizer.json")


def stream(tok, ids, stop_strings=()):
    streamer = TextStreamer(tok, stop_strings)
    deltas = []
    for token_id in ids:
        deltas.append(streamer.push(token_id))
        if streamer.stopped:
            break
    deltas.append(streamer.finish())
    return deltas, streamer


# --- pure helpers -----------------------------------------------------------------------------------------------

def test_find_stop_returns_the_earliest_start():
    assert find_stop("abc STOP def END", ["END", "STOP"]) == 4
    assert find_stop("x END y END", ["END"]) == 2  # the first occurrence of a string, not its last
    assert find_stop("abc", ["x"]) is None
    assert find_stop("abc", []) is None


def test_partial_stop_length_is_the_longest_suffix_prefix():
    assert partial_stop_length("hello <end", ["<end_of_turn>"]) == 4
    assert partial_stop_length("hello", ["<end_of_turn>"]) == 0
    assert partial_stop_length("aab", ["abc", "aabx"]) == 3
    assert partial_stop_length("xyz<end_of_turn", ["<end_of_turn>"]) == len("<end_of_turn")
    assert partial_stop_length("STOP", ["STOP"]) == 0  # the whole stop string is not a proper prefix of it
    assert partial_stop_length("xaa", ["aa"]) == 1


def test_stop_reason():
    assert stop_reason(106, 3, stop_token_ids=(1, 106), max_new_tokens=10) == "stop"
    assert stop_reason(1, 10, stop_token_ids=(1, 106), max_new_tokens=10) == "stop"
    assert stop_reason(42, 10, stop_token_ids=(1, 106), max_new_tokens=10) == "length"
    assert stop_reason(42, 3, stop_token_ids=(1, 106), max_new_tokens=10) is None


def test_stop_strings_are_validated_with_one_line_errors():
    with pytest.raises(Gemma3Error) as empty:
        TextStreamer(None, ["STOP", ""])
    assert str(empty.value) == "stop strings must be non-empty strings"
    with pytest.raises(Gemma3Error) as not_str:
        TextStreamer(None, ["STOP", 7])
    assert str(not_str.value) == "stop strings must be non-empty strings"
    with pytest.raises(Gemma3Error) as one:
        TextStreamer(None, "STOP")
    assert str(one.value) == "stop_strings must be a list of strings, not one string"


class SentencePieceLike:
    """A decoder whose output depends on context, as SentencePiece's: "▁" is a space, and the space that
    starts a decoded text is dropped. Id 1 decodes to nothing (a control token)."""

    PIECES = ["x", "", "▁y", "▁z"]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.PIECES[i] for i in ids).replace("▁", " ").removeprefix(" ")


def test_a_token_that_adds_no_text_keeps_the_decoding_context():
    streamer = TextStreamer(SentencePieceLike())
    deltas = [streamer.push(i) for i in (0, 1, 2)] + [streamer.finish()]
    assert deltas == ["x", "", " y", ""]  # " y" decoded after "x", not alone (which drops its space)


def test_finish_releases_everything_once_and_then_streams_anew():
    streamer = TextStreamer(SentencePieceLike(), ["zz"])
    assert [streamer.push(0), streamer.push(3)] == ["x", " "]  # "z" is held: it may start "zz"
    assert [streamer.finish(), streamer.finish()] == ["z", ""]
    # the ids pushed after finish() are a new text: their deltas concatenate to their own decode
    assert [streamer.push(2), streamer.push(3), streamer.finish()] == ["y", " ", "z"]


# --- the official tokenizer -------------------------------------------------------------------------------------

def test_inputs_exercise_byte_fallback_and_multi_token_characters(tok):
    assert sum(piece.startswith("<0x") for piece in tok.pieces(TEXTS[3])) == 9
    family = tok.encode("👨‍👩‍👧‍👦")
    assert len(family) > 1  # the ZWJ sequence is one grapheme spread over several tokens


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode_and_never_split_a_character(tok, text):
    ids = tok.encode(text)
    deltas, streamer = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not streamer.stopped
    for delta in deltas:
        assert "\ufffd" not in delta
        delta.encode("utf-8")  # no lone surrogates


def test_byte_fallback_character_is_released_whole(tok):
    ids = tok.encode("丣")
    assert len(ids) == 3
    streamer = TextStreamer(tok)
    assert [streamer.push(i) for i in ids] == ["", "", "丣"]


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tok):
    ids = tok.encode("ok 丣")[:-1]
    deltas, _ = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert deltas[-1].endswith("\ufffd")


@pytest.mark.parametrize(
    ("text", "stops", "expected", "stopped"),
    [
        ("The answer is 42.\nUser: next question", ["\nUser:"], "The answer is 42.", True),
        ("Emoji 😀 then STOP here", ["STOP"], "Emoji 😀 then ", True),
        (f"Before {RARE_CJK}丣 after", ["亶丣"], "Before 丣乛", True),  # stop string made of byte-fallback chars
        ("no stop string in here", ["<end_of_turn>"], "no stop string in here", False),
        ("first END then HALT", ["HALT", "END"], "first ", True),
        ("partial <end_of but never completes", ["<end_of_turn>"], "partial <end_of but never completes", False),
        ("ends with a prefix <end_of", ["<end_of_turn>"], "ends with a prefix <end_of", False),
    ],
)
def test_stop_strings(tok, text, stops, expected, stopped):
    ids = tok.encode(text)
    deltas, streamer = stream(tok, ids, stops)
    assert "".join(deltas) == expected
    assert streamer.stopped is stopped


def test_stop_string_spanning_several_tokens_is_held_back_until_decided(tok):
    text = "Sure. ### Instruction: do more"
    ids = tok.encode(text)
    streamer = TextStreamer(tok, ["### Instruction:"])
    shown = ""
    for token_id in ids:
        shown += streamer.push(token_id)
        assert "#" not in shown  # nothing that may start the stop string leaks out early
        if streamer.stopped:
            break
    assert streamer.stopped and shown == "Sure. "
    assert len(tok.encode("### Instruction:")) > 1
    with pytest.raises(RuntimeError, match=r"^push\(\) after a stop string: generation should have ended$"):
        streamer.push(ids[-1])
    assert streamer.finish() == ""


def test_held_back_prefix_is_released_once_it_cannot_match(tok):
    streamer = TextStreamer(tok, ["<end_of_turn>"])
    shown = []
    for token_id in tok.encode("a <end_of the line"):
        shown.append(streamer.push(token_id))
        if "".join(shown) == "a " and tok.decode([token_id]).endswith("of"):
            break  # "<end_of" is on hold: it may still become "<end_of_turn>"
    else:
        pytest.fail(f"'<end_of' was not held back: {shown}")
    for token_id in tok.encode(" the line"):
        shown.append(streamer.push(token_id))
    assert "".join(shown) == "a <end_of the line"


PIECES = ["a", "the", " ", "  ", "\n", "\n\n", "\t", "é", "😀", "👨‍👩‍👧", "\u200d", "🇯🇵", "日本", "丣", "乛",
          "<", "end", "_of", "_turn", ">", "#", "User", ":", "\x00"]
STOPS = ["<end_of_turn>", "\nUser:", "丣乛", "##", "😀👨"]


@settings(max_examples=60, deadline=None)
# the stop strings are among the pieces too, so most examples hold one or more of them (several, in any order)
@given(pieces=st.lists(st.sampled_from(PIECES + STOPS), max_size=30),
       stops=st.lists(st.sampled_from(STOPS), max_size=3))
def test_any_text_streams_to_its_decode_cut_at_the_first_stop(tok, pieces, stops):
    ids = tok.encode("".join(pieces))
    text = tok.decode(ids)
    # the reference, independent of find_stop: the earliest start of any stop string, by str.find
    starts = [text.find(s) for s in stops if s in text]
    expected = text[:min(starts)] if starts else text
    deltas, streamer = stream(tok, ids, stops)
    assert "".join(deltas) == expected
    assert streamer.stopped is bool(starts)
    assert all("\ufffd" not in delta for delta in deltas)


def test_works_with_the_project_tokenizer(official_tokenizer):
    from gemma3.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(official_tokenizer / "tokenizer.json")
    text = TEXTS[4] + " <end_of_turn> hidden"
    ids = tokenizer.encode(text, add_bos=False)
    deltas, streamer = stream(tokenizer, ids, ["<end_of_turn>"])
    assert streamer.stopped and "".join(deltas) == TEXTS[4] + " "
