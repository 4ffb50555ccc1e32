"""Continuous batching without HTTP, on tiny random models: the SlotKVCache gives each row what a KVCache
alone gives it (across the sliding window, after another request used the row), and the scheduler's batched
greedy outputs equal the Generator's one request at a time; cancelling frees rows, a full queue refuses.
The bit-for-bit check on the real model (through the server) is in test_serve.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gemma3.config import Gemma3Config
from gemma3.errors import Gemma3Error
from gemma3.generation.generator import GenerationConfig, Generator
from gemma3.kv_cache import KVCache, SlotKVCache
from gemma3.generation.sampling import SamplingParams
from gemma3.serve.scheduler import Failed, Finished, QueueFull, Request, Scheduler, TokenEvent
from reference import random_model
from test_generate import LetterTokenizer, tiny
from test_kernels import needs_kernel

torch.set_num_threads(2)


class SizedLetters(LetterTokenizer):
    def __len__(self) -> int:
        return 300


@pytest.fixture(scope="module")
def model():
    return random_model(tiny(window=4), seed=5)


@torch.inference_mode()
def alone_logits(model, prompt: list[int], continuation: list[int]) -> list[torch.Tensor]:
    cache = KVCache(model.config, 1, len(prompt) + len(continuation) + 1)
    out = [model(torch.tensor([prompt]), cache=cache, logits_to_keep=1).logits[0, -1]]
    for t in continuation:
        out.append(model(torch.tensor([[t]]), cache=cache, logits_to_keep=1).logits[0, -1])
    return out


@torch.inference_mode()
def test_slot_rows_decode_as_alone_across_the_window_and_after_reuse(model):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 300, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    steps = 14  # window 4: every row crosses it several times
    conts = [torch.randint(4, 300, (steps,), generator=g).tolist() for _ in prompts]
    cache = SlotKVCache(model.config, 4, 40)
    # row 1 first holds another request, which finishes; its stale keys must stay invisible
    stale = torch.randint(4, 300, (11,), generator=g).tolist()
    model(torch.tensor([stale]), cache=cache.row(1), logits_to_keep=1)
    cache.release(1)
    got = [[] for _ in prompts]
    fed = [0] * 4
    for step in range(steps + 4):
        joining = step if step < 4 else None  # row r joins at step r: rows run at different lengths
        decoding = [r for r in range(4) if got[r] and fed[r] < steps]
        if decoding:
            n = max(decoding) + 1
            tokens = torch.zeros(n, 1, dtype=torch.long)
            positions = torch.full((n, 1), -1)
            for r in decoding:
                tokens[r, 0] = conts[r][fed[r]]
                positions[r, 0] = len(prompts[r]) + fed[r]
            logits = model(tokens, positions=positions, cache=cache, logits_to_keep=1).logits[:, -1]
            for r in decoding:
                got[r].append(logits[r])
                fed[r] += 1
        if joining is not None:
            got[joining].append(model(torch.tensor([prompts[joining]]), cache=cache.row(joining),
                                      logits_to_keep=1).logits[0, -1])
    for r in range(4):
        want = alone_logits(model, prompts[r], conts[r])
        assert len(got[r]) == len(want) == steps + 1
        for a, b in zip(got[r], want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_slot_cache_refuses_bad_steps(model):
    cache = SlotKVCache(model.config, 2, 4)
    with pytest.raises(Gemma3Error, match="rows"):
        cache.begin(torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(Gemma3Error, match="at least one row"):
        cache.begin(torch.full((2, 1), -1))
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7, 8]]), cache=cache.row(0), logits_to_keep=1)
        with pytest.raises(Gemma3Error, match="full"):
            cache.begin(torch.tensor([[4], [-1]]))


class Collector:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, (Finished, Failed)):
            self.done.set()

    def tokens(self):
        return [e.token_id for e in self.events if isinstance(e, TokenEvent)]


def test_batched_greedy_equals_the_generator_alone(model):
    tok = SizedLetters()
    prompts = [[2] + list(range(10 + 3 * i, 14 + 5 * i)) for i in range(6)]
    gen = Generator(random_model(tiny(window=4), seed=5), tok, pack_weights=False)
    want = [gen.generate(p, GenerationConfig(max_new_tokens=8 + i, sampling=SamplingParams(temperature=0),
                                             stop_token_ids=())).token_ids for i, p in enumerate(prompts)]
    scheduler = Scheduler(model, tok, max_batch=4, context=64, prefill_chunk=3).start()
    scheduler.stop_ids = ()
    try:
        sinks = []
        for i, p in enumerate(prompts):
            sinks.append(Collector())
            scheduler.submit(Request(prompt_ids=p, max_tokens=8 + i, sink=sinks[-1]))
            time.sleep(0.01)
        for s in sinks:
            assert s.done.wait(60)
        assert [s.tokens() for s in sinks] == want
        assert all(isinstance(s.events[-1], Finished) and s.events[-1].reason == "length" for s in sinks)
        assert scheduler.stats()["active"] == 0
    finally:
        scheduler.close()


def test_cancel_frees_the_row_and_a_full_queue_refuses(model):
    tok = SizedLetters()
    scheduler = Scheduler(model, tok, max_batch=1, context=128, max_queue=1).start()
    try:
        first = Collector()
        long = Request(prompt_ids=[2, 5, 6], max_tokens=120, sink=first,
                       sampling=SamplingParams(temperature=0))
        scheduler.submit(long)
        deadline = time.monotonic() + 30
        while scheduler.stats()["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        scheduler.submit(Request(prompt_ids=[2, 7], max_tokens=2, sink=Collector()))  # waits
        with pytest.raises(QueueFull):
            scheduler.submit(Request(prompt_ids=[2, 8], max_tokens=2, sink=Collector()))
        long.cancel()
        deadline = time.monotonic() + 30
        while scheduler.stats()["active"] + scheduler.stats()["waiting"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.stats()["active"] == scheduler.stats()["waiting"] == 0
        assert not first.done.is_set()  # a cancelled request gets no more events
        with pytest.raises(Gemma3Error, match="context"):
            scheduler.submit(Request(prompt_ids=[2] * 128, max_tokens=1, sink=Collector()))
    finally:
        scheduler.close()


def test_a_failing_request_fails_alone(model):
    tok = SizedLetters()
    scheduler = Scheduler(model, tok, max_batch=2, context=64).start()

    class Broken:
        def matcher(self, tokenizer, stop_ids):
            raise Gemma3Error("this grammar cannot be used")

    try:
        good, bad = Collector(), Collector()
        scheduler.submit(Request(prompt_ids=[2, 5, 6], max_tokens=6, sink=good))
        scheduler.submit(Request(prompt_ids=[2, 5, 6], max_tokens=6, sink=bad, grammar=Broken()))
        assert good.done.wait(30) and bad.done.wait(30)
        assert isinstance(good.events[-1], Finished) and len(good.tokens()) == 6
        assert isinstance(bad.events[-1], Failed) and "cannot be used" in bad.events[-1].message
    finally:
        scheduler.close()


@needs_kernel
def test_one_decoding_row_takes_the_fused_step_and_the_same_bits(monkeypatch):
    """A quantized model with `fuse_steps`: a step with one decoding row runs the fused native step (as
    `generate` does), and the tokens and log-probabilities are the same bits as the modules' batched steps."""
    from test_decode_step import CONFIG, quantized_model

    from gemma3.accel.fused_step import FusedDecodeStep

    model = quantized_model(Gemma3Config(**{**CONFIG.__dict__, "sliding_window": 6}))
    tok = SizedLetters()
    prompts = [[2] + list(range(10 + 3 * i, 14 + 5 * i)) for i in range(5)]
    fused_calls = []
    original = FusedDecodeStep.__call__
    monkeypatch.setattr(FusedDecodeStep, "__call__", lambda self, t: fused_calls.append(t) or original(self, t))

    def serve(fuse_steps: bool, together: bool):
        scheduler = Scheduler(model, tok, max_batch=4, context=64, prefill_chunk=4, fuse_steps=fuse_steps).start()
        scheduler.stop_ids = ()
        try:
            sinks = []
            for i, p in enumerate(prompts):
                sinks.append(Collector())
                scheduler.submit(Request(prompt_ids=p, max_tokens=10 + i, sink=sinks[-1], logprobs=0))
                if not together:
                    assert sinks[-1].done.wait(60)
            assert all(s.done.wait(60) for s in sinks)
            return [[(e.token_id, e.logprob) for e in s.events if isinstance(e, TokenEvent)] for s in sinks]
        finally:
            scheduler.close()

    alone = serve(fuse_steps=True, together=False)
    assert len(fused_calls) == sum(10 + i - 1 for i in range(5))  # every decode step, each request alone
    fused_calls.clear()
    batched = serve(fuse_steps=False, together=True)
    assert not fused_calls
    assert batched == alone  # the same token ids and the same float log-probabilities, bit for bit
    assert serve(fuse_steps=True, together=True) == alone


def test_the_scheduler_thread_computes_with_the_threads_it_was_given(model):
    """--threads is torch.set_num_threads on the main thread, which sets that thread's OpenMP threads only: the
    scheduler's thread must take the same count before its first step (the native kernels read it as it is)."""
    import ctypes

    gomp = next((line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line), None)
    if gomp is None:
        pytest.skip("no libgomp in this process")
    omp_threads = ctypes.CDLL(gomp).omp_get_max_threads
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scheduler = Scheduler(model, SizedLetters(), max_batch=2, context=64).start()
        try:
            assert scheduler.run_exclusive(lambda m: omp_threads()).result(10) == 1
        finally:
            scheduler.close()
    finally:
        torch.set_num_threads(before)
