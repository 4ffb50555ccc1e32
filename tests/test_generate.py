"""Generation on tiny random models: the cached loop equals uncached greedy decoding, batches equal single
runs, stop conditions and chat-cache reuse behave. Real-weight checks are in test_generate_real.py."""

from __future__ import annotations

import pytest
import torch

from gemma3.config import Gemma3Config, hybrid_layer_types
from gemma3.errors import Gemma3Error
from gemma3.generation.generator import ChatSession, GenerationConfig, Generator
from gemma3.generation.sampling import SamplingParams
from reference import random_model

torch.set_num_threads(2)
GREEDY = SamplingParams(temperature=0)


class LetterTokenizer:
    """A stand-in, lossless tokenizer for a 300-token vocabulary: other ids are one CJK character each (so
    decoded text re-encodes to the same ids, as with the real tokenizer); special tokens match as text."""

    special = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>"}
    BASE = 0x4E00

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [2] if add_bos else []
        i = 0
        while i < len(text):
            for tid, piece in self.special.items():
                if text.startswith(piece, i):
                    ids.append(tid)
                    i += len(piece)
                    break
            else:
                code = ord(text[i]) - self.BASE
                ids.append(code if 0 <= code < 300 and code not in self.special else 10 + ord(text[i]) % 90)
                i += 1
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.special.get(i) or chr(self.BASE + i) for i in ids)


def tiny(window: int = 4) -> Gemma3Config:
    return Gemma3Config(vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=7,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=window, layer_types=hybrid_layer_types(7), max_position_embeddings=128)


@pytest.fixture(scope="module")
def gen():
    return Generator(random_model(tiny(), seed=3), LetterTokenizer())


@torch.no_grad()
def uncached_greedy(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    out = []
    for _ in range(n):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(token)
        ids.append(token)
    return out


def test_cached_greedy_equals_uncached_past_window(gen):
    prompt = gen.encode("the quick brown fox")
    config = GenerationConfig(max_new_tokens=30, sampling=GREEDY, stop_token_ids=(), prefill_chunk=7)
    result = gen.generate(prompt, config)
    assert result.token_ids == uncached_greedy(gen.model, prompt, 30)
    assert result.finish_reason == "length" and result.prompt_tokens == len(prompt)


def test_padded_batch_rows_equal_single_runs(gen):
    prompts = ["a much longer prompt than the others", "short", "middle sized one"]
    config = GenerationConfig(max_new_tokens=12, sampling=GREEDY, stop_token_ids=())
    batch = gen.generate_batch(prompts, config)
    for prompt, result in zip(prompts, batch):
        assert result.token_ids == gen.generate(prompt, config).token_ids


def test_sampling_is_seeded(gen):
    config = GenerationConfig(max_new_tokens=15, sampling=SamplingParams(temperature=1.0, top_k=50), seed=7,
                              stop_token_ids=())
    first, again = gen.generate("hello", config), gen.generate("hello", config)
    assert first.token_ids == again.token_ids
    other = gen.generate("hello", GenerationConfig(max_new_tokens=15, sampling=config.sampling, seed=8,
                                                  stop_token_ids=()))
    assert other.token_ids != first.token_ids


def test_stop_token_and_stop_string(gen):
    prompt = gen.encode("stop here")
    free = gen.generate(prompt, GenerationConfig(max_new_tokens=20, sampling=GREEDY, stop_token_ids=()))
    stop_at = free.token_ids[5]
    first = free.token_ids.index(stop_at)
    stopped = gen.generate(prompt, GenerationConfig(max_new_tokens=20, sampling=GREEDY, stop_token_ids=(stop_at,)))
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[:first + 1]
    assert stopped.text == LetterTokenizer().decode(free.token_ids[:first])  # the stop token is not text
    stop_text = free.text[6:9]
    cut = gen.generate(prompt, GenerationConfig(max_new_tokens=20, sampling=GREEDY, stop_token_ids=(),
                                                stop_strings=(stop_text,)))
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.index(stop_text)]


def test_stream_equals_generate(gen):
    config = GenerationConfig(max_new_tokens=25, sampling=GREEDY, stop_token_ids=())
    deltas = list(gen.stream("streaming", config))
    assert "".join(deltas) == gen.generate("streaming", config).text == gen.last_result.text


def test_context_limit(gen):
    prompt = [2] + [50] * 120
    result = gen.generate(prompt, GenerationConfig(max_new_tokens=50, sampling=GREEDY, stop_token_ids=()))
    assert result.finish_reason == "context" and len(result.token_ids) == 128 - 121


def test_chat_reuses_cache_and_matches_fresh_session(gen):
    config = GenerationConfig(max_new_tokens=8, sampling=GREEDY, stop_token_ids=())
    chat = ChatSession(gen, system="be brief", config=config, context_length=128)
    first = "".join(chat.send("hi there"))
    second = "".join(chat.send("and again"))
    assert chat.last_reused_tokens > 0  # turn 2 prefilled only its new tokens
    fresh = ChatSession(gen, system="be brief", config=config, context_length=128)
    fresh.messages = [{"role": "user", "content": "hi there"}, {"role": "model", "content": first}]
    assert "".join(fresh.send("and again")) == second
    assert fresh.last_reused_tokens == 0


def test_chat_drops_oldest_turns_when_full(gen):
    config = GenerationConfig(max_new_tokens=8, sampling=GREEDY, stop_token_ids=())
    chat = ChatSession(gen, config=config, context_length=70)
    for i in range(6):
        "".join(chat.send(f"message number {i}"))
    assert chat.dropped_turns > 0
    assert chat.messages[-2]["content"] == "message number 5"
    with pytest.raises(Gemma3Error, match="needs .* tokens"):
        list(chat.send("x" * 200))


def test_chat_session_refuses_a_max_new_tokens_that_fills_the_context(gen):
    """Each turn keeps max_new_tokens of the context for its reply: at or past the context no message fits (before,
    every send failed with a negative count, "only -9223372036854775744 fit")."""
    for n in (128, 2**63):
        with pytest.raises(Gemma3Error, match=f"max_new_tokens {n} leaves no room for a message in the 128-token"):
            ChatSession(gen, config=GenerationConfig(max_new_tokens=n))
    with pytest.raises(Gemma3Error, match="max_new_tokens 70 leaves no room for a message in the 70-token context"):
        ChatSession(gen, config=GenerationConfig(max_new_tokens=70), context_length=70)
    chat = ChatSession(gen, config=GenerationConfig(max_new_tokens=69, sampling=GREEDY), context_length=70)
    with pytest.raises(Gemma3Error, match="needs .* tokens, but only 1 fit"):
        list(chat.send("hello"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampling=dict(temperature=-1)), "temperature"),
    (dict(sampling=dict(top_p=0)), "top_p"),
    (dict(sampling=dict(top_p=1.5)), "top_p"),
    (dict(sampling=dict(top_k=-1)), "top_k"),
    (dict(sampling=dict(min_p=2)), "min_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_parameters(gen, kwargs, match):
    with pytest.raises(Gemma3Error, match=match):
        sampling = SamplingParams(**kwargs.pop("sampling", {}))
        gen.generate("hello", GenerationConfig(sampling=sampling, **kwargs))


def test_bad_prompts(gen):
    with pytest.raises(Gemma3Error, match="empty"):
        gen.generate("")
    with pytest.raises(Gemma3Error, match="context is 128 tokens"):
        gen.generate([2] * 200)
