"""When a generated row ends, and what text each of its tokens adds: the one rule the generator, the server's
scheduler and the trainer's samples follow.

A row ends, in OpenAI's `finish_reason` words plus our own "context":

    a stop token (<eos> 1, <end_of_turn> 106, ...)     "stop"     recorded in `generated`; its text is never shown
    a stop string                                      "stop"     the text stops before it (TextStreamer)
    the grammar's end (the JSON closed)                "stop"     where `grammar_ends_row`
    max_new_tokens                                     "length"
    the context is full (no room for another token)    "context"  the server calls it "length"

The first that applies wins in this order: a stop token, then a stop string or the grammar's end, then the budget.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal

from gemma3.text.streaming import TextStreamer

END_OF_TURN = 106
DEFAULT_STOP_IDS = (1, END_OF_TURN)  # <eos>, <end_of_turn>: IT models end a turn with the latter

FinishReason = Literal["stop", "length", "context"]


def default_stop_ids(config) -> tuple[int, ...]:
    """The ids that end a generation when none are given: the checkpoint's eos ids, plus <eos> and
    <end_of_turn> (in that order, each once)."""
    return tuple(dict.fromkeys((*config.eos_token_id, *DEFAULT_STOP_IDS)))


def stop_reason(token_id: int, num_generated: int, *, stop_token_ids: Collection[int], max_new_tokens: int,
                room: int | None = None) -> FinishReason | None:
    """Why generation ends after `token_id`, the `num_generated`-th new token, by its id and count alone:
    "stop" for a stop token, "length" when max_new_tokens are spent, "context" when the `room` the context
    leaves after the prompt is, None to go on. A stop string is reported by `TextStreamer.stopped`."""
    if token_id in stop_token_ids:
        return "stop"
    if num_generated >= max_new_tokens:
        return "length"
    if room is not None and num_generated >= room:
        return "context"
    return None


class RowState:
    """One row's generated tokens and whether (and why) it has finished: `push` each sampled token.

    `streamer` turns tokens into text (None: no text is kept, `push` returns ""); `matcher` is the row's
    grammar state (gemma3.generation.structured.JsonMatcher), advanced with every token but a stop token.
    `grammar_ends_row`: the grammar's end finishes the row at once; False leaves the stop token the finished
    grammar allows to be sampled next (the server counts it, as it counts every stop token)."""

    def __init__(self, stop_ids: Collection[int], max_new_tokens: int, room: int | None = None,
                 streamer: TextStreamer | None = None, matcher=None, grammar_ends_row: bool = True):
        self.stop_ids, self.max_new_tokens, self.room = stop_ids, max_new_tokens, room
        self.streamer, self.matcher, self.grammar_ends_row = streamer, matcher, grammar_ends_row
        self.generated: list[int] = []  # every sampled id, the stop token included
        self.reason: FinishReason | None = None
        self.stop_token: int | None = None  # the stop token that ended the row, if one did

    @property
    def finished(self) -> bool:
        return self.reason is not None

    @property
    def text_ids(self) -> list[int]:
        """The generated ids that are text: all but a stop token that ended the row."""
        return self.generated[:-1] if self.stop_token is not None else self.generated

    def push(self, token: int) -> str:
        """Take the row's next sampled token; return the text that became safe to show (often ""). Sets
        `reason` when the row ends with this token."""
        if self.finished:
            raise RuntimeError("push() after the row finished")
        self.generated.append(token)
        self.reason = stop_reason(token, len(self.generated), stop_token_ids=self.stop_ids,
                                  max_new_tokens=self.max_new_tokens, room=self.room)
        if token in self.stop_ids:
            self.stop_token = token
            return ""
        if self.matcher is not None:
            self.matcher.advance(token)
        text = self.streamer.push(token) if self.streamer is not None else ""
        if ((self.streamer is not None and self.streamer.stopped)
                or (self.grammar_ends_row and self.matcher is not None and self.matcher.finished)):
            self.reason = "stop"
        return text

    def flush(self) -> str:
        """The text held back (a possible start of a stop string, half a character): call once the row ended."""
        return self.streamer.finish() if self.streamer is not None else ""
