"""Token ids → text deltas, one token at a time, safe to print as they come.

Two things make naive per-token decoding wrong:

* **Split characters.** Gemma 3's vocabulary falls back to byte tokens `<0x00>`…`<0xFF>` for characters it
  lacks (a rare CJK ideograph is three of them), so a token can end in the middle of a UTF-8 character.
  Decoding it alone gives U+FFFD. We decode a short window of recent ids and release text only once it
  does not end in U+FFFD (the approach of TGI and vLLM's incremental detokenizers). Decoding a window
  rather than single ids also keeps whatever the tokenizer's decoder does across token boundaries.
* **Stop strings.** Text that could still grow into a stop string is held back; when one completes, the
  text before it is released and the stream stops. The stop string itself is never emitted.

The streamer needs only `tokenizer.decode(ids: list[int]) -> str`. Stop *tokens* (`<end_of_turn>`, `<eos>`)
are the generation loop's business: it should not feed them here (gemma3.generation.finish.RowState does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gemma3.errors import Gemma3Error

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


def find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Index where the earliest stop string in `text` starts, or None if none occurs."""
    starts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(starts) if starts else None


def partial_stop_length(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string: the text that must
    be held back because the next tokens may complete a stop string."""
    longest = 0
    for stop in stop_strings:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class TextStreamer:
    """Incremental detokenizer with stop strings.

    >>> streamer = TextStreamer(tokenizer, stop_strings=["\\nUser:"])
    >>> for token in generated_tokens:
    ...     print(streamer.push(token), end="")
    ...     if streamer.stopped:
    ...         break
    >>> print(streamer.finish(), end="")

    Concatenating every `push` result and `finish()` gives the decoded text, cut before the first stop
    string if one occurred.
    """

    def __init__(self, tokenizer: Decoder, stop_strings: Sequence[str] = ()):
        if isinstance(stop_strings, str):
            raise Gemma3Error("stop_strings must be a list of strings, not one string")
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise Gemma3Error("stop strings must be non-empty strings")
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.stopped = False
        self._ids: list[int] = []
        # ids[_prefix:_read] were decoded already; decoding from _prefix gives the tokenizer context.
        self._prefix = 0
        self._read = 0
        self._pending = ""  # stable text not yet released: a possible start of a stop string

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became safe to show (often "").

        Text ending in U+FFFD waits for the next token even when the U+FFFD is real (a run of invalid
        bytes); `finish()` releases it if nothing follows."""
        if self.stopped:
            raise RuntimeError("push() after a stop string: generation should have ended")
        self._ids.append(token_id)
        window = self._ids[self._prefix:]
        seen = self.tokenizer.decode(self._ids[self._prefix:self._read])
        text = self.tokenizer.decode(window)
        if len(text) <= len(seen) or text.endswith(REPLACEMENT_CHAR):
            return ""  # the last token ends mid-character (or added no text yet)
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(text[len(seen):])

    def finish(self) -> str:
        """End of generation: release everything held back (an incomplete character decodes as U+FFFD)."""
        if self.stopped:
            return ""
        seen = self.tokenizer.decode(self._ids[self._prefix:self._read])
        tail = self.tokenizer.decode(self._ids[self._prefix:])[len(seen):]
        self._prefix = self._read = len(self._ids)
        text, self._pending = self._pending + tail, ""
        return text

    def _release(self, new_text: str) -> str:
        """Apply the stop strings to the held-back text plus `new_text`; return what may be shown."""
        text = self._pending + new_text
        stop = find_stop(text, self.stop_strings)
        if stop is not None:
            self.stopped = True  # push() and finish() read nothing more
            return text[:stop]
        hold = partial_stop_length(text, self.stop_strings)
        self._pending = text[len(text) - hold:]
        return text[:len(text) - hold]
