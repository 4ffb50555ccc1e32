"""Continuous batching: one thread owns the model and serves every request in one running batch.

    submit(request) ──► waiting queue ──► a free cache row (slot) ──► prefill, one chunk per loop turn
                                                                         │
                          every loop turn: one decode step for all decoding rows ◄──┘
                                                │
                          each row: sample its token, stream its text, finish ──► row freed

Why batch: a decode step on a CPU is bound by reading the weights (for the embedded 270M, ~250 MB a
token), and the kernels read each weight once for up to 8 rows, so 8 running requests cost little more than
one. Requests join the batch at a step boundary and leave when they finish, each in its own row of a
`SlotKVCache` (its own length and positions), so nobody waits for the longest request of a batch. A new
prompt is prefilled in chunks of `prefill_chunk` tokens, one chunk per turn, so the running rows keep
streaming while it is read.

Batching is invisible in the results: a row is prefilled alone, its decode step computes the same bits as
alone (each row of the kernels' products is summed in the same order whatever the other rows hold, and the
attention kernel leaves the other rows' longer caches out of its sums), and each request samples with its own
parameters and its own seeded generator. The tests check that greedy outputs of 8 staggered requests equal
the requests served one at a time.

The HTTP side never touches tensors: it submits a `Request` with a `sink` callback and receives `TokenEvent`s,
then one `Finished` (or `Failed`), on the scheduler's thread (the server forwards them to its event loop).
Work that needs the model itself (the playground's look inside it: a forward with hooks on its layers) is handed
to the same thread with `run_exclusive`, and runs between two turns, so it never meets a decode step.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from gemma3.errors import Gemma3Error
from gemma3.generation.finish import RowState, default_stop_ids
from gemma3.generation.sampling import SamplingParams, check_finite, mask_padding, next_token
from gemma3.kv_cache import SlotKVCache
from gemma3.text.streaming import TextStreamer


_admitted = itertools.count()  # admission order: prefills run first come, first served


class QueueFull(Gemma3Error):
    """The waiting queue holds --max-queue requests already (HTTP 429)."""


@dataclass
class Request:
    """One completion to generate. Validated by the caller (the HTTP layer) before it is submitted."""

    prompt_ids: list[int]
    max_tokens: int
    sink: Callable[[object], None]  # called with each event, on the scheduler thread; must not block
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0))
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in what was generated
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the k most likely
    grammar: object | None = None  # a gemma3.generation.structured.JsonGrammar
    id: str = ""
    cancelled: bool = False  # set by the HTTP side (client gone); the row is freed at the next step

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class TokenEvent:
    token_id: int
    text: str  # the text this token released (may be "": half a character, or a possible stop string)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    is_stop_token: bool = False


@dataclass
class Finished:
    reason: str  # "stop" or "length" (OpenAI's finish_reason)
    prompt_tokens: int
    completion_tokens: int
    prompt_s: float = 0.0  # from taking a row to the first token: the prefill (and the first sample)
    decode_s: float = 0.0  # from the first token to the last: completion_tokens - 1 decode steps


@dataclass
class Failed:
    message: str
    status: int = 500  # the HTTP status it maps to: 500 a failed step, 503 a server shutting down


class _Sequence:
    """A request's state while it holds a row."""

    def __init__(self, request: Request, row: int, scheduler: "Scheduler"):
        self.request, self.row = request, row
        self.order = next(_admitted)
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.prefilled = 0
        self.next_input: int | None = None  # the sampled token to feed at the next decode step
        streamer = TextStreamer(scheduler.tokenizer, request.stop_strings)
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.generator = torch.Generator().manual_seed(seed)
        self.history = torch.tensor([request.prompt_ids], dtype=torch.long)
        self.counts: torch.Tensor | None = None
        if request.presence_penalty or request.frequency_penalty:
            self.counts = torch.zeros(scheduler.model.config.vocab_size, dtype=torch.float32)
        self.matcher = request.grammar.matcher(scheduler.tokenizer, scheduler.stop_ids) if request.grammar else None
        # the row ends where the cache does; a finished grammar leaves its stop token to be sampled (and counted)
        self.state = RowState(scheduler.stop_ids, request.max_tokens, scheduler.context - len(request.prompt_ids),
                              streamer, self.matcher, grammar_ends_row=False)

    @property
    def generated(self) -> list[int]:
        return self.state.generated

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.request.prompt_ids)

    @property
    def position(self) -> int:  # the position of next_input
        return len(self.request.prompt_ids) + len(self.generated) - 1


class Scheduler:
    """Owns the model; `submit` requests from any thread. `start()` runs the loop in a daemon thread."""

    def __init__(self, model, tokenizer, max_batch: int = 8, context: int = 4096, max_queue: int = 64,
                 prefill_chunk: int = 256, dtype: torch.dtype | None = None, fuse_steps: bool = False):
        """`fuse_steps`: a step with one decoding row goes through the fused native step where the model allows
        it (gemma3.accel.fused_step, as `generate` does; the same bits as the modules' step)."""
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise Gemma3Error("max_batch and prefill_chunk must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model.eval(), tokenizer
        config = model.config
        if context > config.max_position_embeddings:
            raise Gemma3Error(f"--context {context} is more than the model's {config.max_position_embeddings} tokens")
        self.context, self.max_batch, self.max_queue, self.prefill_chunk = context, max_batch, max_queue, prefill_chunk
        param = next(model.parameters())
        dtype = dtype or (param.dtype if param.dtype.is_floating_point else torch.float32)
        self.cache = SlotKVCache(config, max_batch, context, dtype, param.device)
        # embedding rows past the tokenizer's vocabulary (the 4B-27B's padding rows) are no tokens
        self.vocab = min(config.vocab_size, len(tokenizer)) if hasattr(tokenizer, "__len__") else config.vocab_size
        self.stop_ids = default_stop_ids(config)
        self._waiting: collections.deque[Request] = collections.deque()
        self._jobs: collections.deque[tuple[Future, Callable]] = collections.deque()
        self._rows: dict[int, _Sequence] = {}
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.fuse_steps = fuse_steps
        # torch.set_num_threads (--threads) sets the OpenMP threads of the thread that calls it; a new thread starts
        # with the default (every core) until a torch op happens to set it, and the native kernels read it too
        self.threads = torch.get_num_threads()
        self._fused: dict[int, object] = {}  # row → its FusedDecodeStep (None: the modules), built at first use
        self.steps = 0  # decode steps run (for /health and tests)
        self.served = 0

    # ------------------------------------------------------------------ any thread
    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="gemma3-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        n = len(request.prompt_ids)
        if n == 0:
            raise Gemma3Error("the prompt is empty")
        if n >= self.context:
            raise Gemma3Error(f"the prompt has {n} tokens, but the context is {self.context}")
        if request.max_tokens < 1:
            raise Gemma3Error("max_tokens must be >= 1")
        with self._wake:
            if self._stop:
                raise Gemma3Error("the server is shutting down")
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - len(self._rows)):
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting")
            self._waiting.append(request)
            self._wake.notify()

    def run_exclusive(self, fn: Callable, max_waiting: int = 1) -> Future:
        """Run fn(model) on the scheduler thread between two turns; returns its Future. The model is the
        thread's own: a forward with hooks on its layers (gemma3.eval.plot.trace) must not meet a decode step.
        Raises QueueFull when `max_waiting` jobs are already waiting; a job cancelled before it starts is skipped."""
        future: Future = Future()
        with self._wake:
            if self._stop:
                raise Gemma3Error("the server is shutting down")
            if sum(not f.done() for f, _ in self._jobs) >= max_waiting:
                raise QueueFull("the server is busy: another look inside the model is waiting")
            self._jobs.append((future, fn))
            self._wake.notify()
        return future

    def stats(self) -> dict:
        with self._wake:
            return {"active": len(self._rows), "waiting": len(self._waiting), "slots": self.max_batch,
                    "decode_steps": self.steps, "served": self.served}

    # ------------------------------------------------------------------ the scheduler thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        torch.set_num_threads(self.threads)
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self._rows and not self._jobs:
                    self._wake.wait()
                if self._stop:
                    break
                self._admit()
                jobs = list(self._jobs)
                self._jobs.clear()
            for future, fn in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.model))
                    except BaseException as e:  # noqa: BLE001 - the job's caller gets its failure
                        future.set_exception(e)
            try:
                with torch.inference_mode():
                    self._turn()
            except Exception as e:  # noqa: BLE001 - a failed step fails the requests in it, never the server
                for seq in list(self._rows.values()):
                    self._fail(seq, _message(e))
        with self._wake:
            for seq in list(self._rows.values()):
                self._fail(seq, "the server is shutting down", 503)
            while self._waiting:
                self._waiting.popleft().sink(Failed("the server is shutting down", 503))
            while self._jobs:
                future, _ = self._jobs.popleft()
                if future.set_running_or_notify_cancel():
                    future.set_exception(Gemma3Error("the server is shutting down"))

    def _admit(self) -> None:
        free = [r for r in range(self.max_batch) if r not in self._rows]
        while self._waiting and free:
            request = self._waiting.popleft()
            if request.cancelled:
                continue
            row = free.pop(0)  # lowest first: keeps the decode batch [0, n) dense
            self.cache.release(row)
            try:
                self._rows[row] = _Sequence(request, row, self)
            except Exception as e:  # noqa: BLE001 - e.g. the grammar engine refused; the request fails alone
                request.sink(Failed(str(e)))

    def _turn(self) -> None:
        for seq in [s for s in self._rows.values() if s.request.cancelled]:
            self._release(seq)
        decoding = [s for s in self._rows.values() if not s.prefilling]
        if decoding:
            self._decode(decoding)
        prefilling = [s for s in self._rows.values() if s.prefilling]
        if prefilling:
            seq = min(prefilling, key=lambda s: s.order)
            try:
                self._prefill_chunk(seq)
            except Exception as e:  # noqa: BLE001 - one request's failure (its grammar, its logits) is its own
                self._fail(seq, _message(e))

    def _prefill_chunk(self, seq: _Sequence) -> None:
        ids = seq.request.prompt_ids
        chunk = ids[seq.prefilled:seq.prefilled + self.prefill_chunk]
        logits = self.model(torch.tensor([chunk]), cache=self.cache.row(seq.row), logits_to_keep=1).logits
        seq.prefilled += len(chunk)
        if not seq.prefilling:
            self._sample(seq, logits[0, -1])

    def _decode(self, decoding: list[_Sequence]) -> None:
        if len(decoding) == 1 and self._fused_step(decoding[0].row) is not None:
            # one row: the whole step in one native call, as `generate` runs it (the Python of ~700 module
            # calls was half of a one-row step's time), and the same bits as the modules would give
            seq = decoding[0]
            logits = self._fused[seq.row](seq.next_input)
            self.steps += 1
            try:
                self._sample(seq, logits[0])
            except Exception as e:  # noqa: BLE001
                self._fail(seq, _message(e))
            return
        n = max(s.row for s in decoding) + 1
        tokens = torch.zeros(n, 1, dtype=torch.long)
        positions = torch.full((n, 1), -1, dtype=torch.long)
        for s in decoding:
            tokens[s.row, 0], positions[s.row, 0] = s.next_input, s.position
        logits = self.model(tokens, positions=positions, cache=self.cache, logits_to_keep=1).logits[:, -1]
        self.steps += 1
        for s in decoding:
            try:
                self._sample(s, logits[s.row])
            except Exception as e:  # noqa: BLE001
                self._fail(s, _message(e))

    def _fused_step(self, row: int):
        if not self.fuse_steps:
            return None
        if row not in self._fused:
            from gemma3.accel.fused_step import FusedDecodeStep, reason_not_fused

            view = self.cache.row(row)
            self._fused[row] = FusedDecodeStep(self.model, view) if reason_not_fused(self.model, view) is None else None
        return self._fused[row]

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Pick seq's next token from its logits (V,), send it, and finish or free the row when done."""
        request = seq.request
        logits = logits.float()[None]
        check_finite(logits, len(seq.generated))  # raises: the caller fails this request alone
        mask_padding(logits, self.vocab)
        logprob = top = None
        if request.logprobs is not None:
            logp = torch.log_softmax(logits[0], dim=-1)
        if seq.counts is not None:
            logits = logits - request.frequency_penalty * seq.counts - request.presence_penalty * (seq.counts > 0)
        if seq.matcher is not None:
            logits = seq.matcher.constrain(logits)
        token = int(next_token(logits, request.sampling, seq.history, seq.generator)[0])
        if request.logprobs is not None:
            logprob = float(logp[token])
            if request.logprobs:
                values, ids = torch.topk(logp, request.logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
        seq.history = torch.cat([seq.history, torch.tensor([[token]])], dim=1)
        if seq.counts is not None:
            seq.counts[token] += 1
        state = seq.state
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        text = state.push(token)
        if state.finished:
            text += state.flush()
        is_stop = state.stop_token is not None
        if not is_stop or text:  # a stop token is sent only to carry the text held back before it
            request.sink(TokenEvent(token, text, logprob, top, is_stop))
        if not state.finished:
            seq.next_input = token
            return
        reason = "length" if state.reason == "context" else state.reason  # OpenAI's words: a full context is "length"
        now = time.perf_counter()
        request.sink(Finished(reason, len(request.prompt_ids), len(seq.generated),
                              prompt_s=seq.first_token_at - seq.started, decode_s=now - seq.first_token_at))
        self.served += 1
        self._release(seq)

    def _fail(self, seq: _Sequence, message: str, status: int = 500) -> None:
        seq.request.sink(Failed(message, status))
        self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        with self._wake:
            self._rows.pop(seq.row, None)
        self.cache.release(seq.row)


def _message(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if isinstance(e, Gemma3Error) else f"generation failed: {text}"

