"""Sampling: each transform on hand-made logits, equality with transformers' own processors (one by one and
as the list `generate()` builds), validation, and seeded reproducibility."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.utils import GenerationMixin

from gemma3.errors import Gemma3Error
from gemma3.generation.sampling import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    check_finite,
    greedy,
    mask_padding,
    next_token,
    process_logits,
    sample,
    tokenizer_vocab,
)

INF = math.inf


def kept(logits: torch.Tensor) -> list[list[int]]:
    """Indices of the tokens a filter kept, per row."""
    return [torch.nonzero(row != -INF).flatten().tolist() for row in logits]


# --- hand-made inputs -------------------------------------------------------------------------------------------

def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1, 0]]), 2.0)  # repeats count once
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_repetition_penalty_ignores_padding_and_out_of_vocab_ids():
    logits = torch.tensor([[2.0, 2.0, 2.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[-1, 7, 2]]), 2.0)
    assert out.tolist() == [[2.0, 2.0, 1.0]]


def test_repetition_penalty_is_per_row_and_leaves_input_alone():
    logits = torch.tensor([[4.0, 4.0], [4.0, 4.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0], [1]]), 4.0)
    assert out.tolist() == [[1.0, 4.0], [4.0, 1.0]]
    assert logits.tolist() == [[4.0, 4.0], [4.0, 4.0]]


def test_filters_that_are_off_hand_back_the_same_tensor():
    """Off costs nothing: no copy of the (B, V) logits, every decode step."""
    logits = torch.tensor([[0.0, -200.0, 3.0]])  # -200: its probability underflows to 0 in float32
    assert apply_repetition_penalty(logits, torch.tensor([[0, 2]]), 1.0) is logits
    assert apply_repetition_penalty(logits, torch.zeros(1, 0, dtype=torch.long), 2.0) is logits
    assert apply_top_k(logits, 0) is logits
    assert apply_top_k(logits, 3) is logits
    assert apply_top_p(logits, 1.0) is logits
    assert apply_min_p(logits, 0.0) is logits


def test_temperature():
    assert apply_temperature(torch.tensor([[1.0, -2.0]]), 0.5).tolist() == [[2.0, -4.0]]


def test_top_k_keeps_k_largest_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [1.0, 2.0, 2.0, 0.0]])
    assert kept(apply_top_k(logits, 2)) == [[1, 3], [1, 2]]
    assert kept(apply_top_k(logits, 1)) == [[1], [1, 2]]
    assert torch.equal(apply_top_k(logits, 0), logits)
    assert torch.equal(apply_top_k(logits, 10), logits)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert kept(apply_top_p(logits, 0.5)) == [[0]]
    assert kept(apply_top_p(logits, 0.6)) == [[0, 1]]
    assert kept(apply_top_p(logits, 0.9)) == [[0, 1, 2]]
    assert kept(apply_top_p(logits, 1.0)) == [[0, 1, 2, 3]]
    assert kept(apply_top_p(torch.tensor([[0.9, 0.1]]).log(), 0.01)) == [[0]]  # the top token always stays


def test_min_p_scales_with_the_top_probability():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert kept(apply_min_p(logits, 0.5)) == [[0, 1]]  # threshold 0.25
    assert kept(apply_min_p(logits, 0.2)) == [[0, 1, 2]]  # threshold 0.1
    assert kept(apply_min_p(logits, 1.0)) == [[0]]
    assert torch.equal(apply_min_p(logits, 0.0), logits)
    # a probability exactly at the threshold stays (HF's `probs < threshold` drops): here tied top tokens
    assert kept(apply_min_p(torch.tensor([[1.0, 1.0, 0.0]]), 1.0)) == [[0, 1]]


def test_greedy_and_sample_on_one_hot():
    logits = torch.tensor([[0.0, 3.0, 1.0], [-INF, -INF, 0.0]])
    assert greedy(logits).tolist() == [1, 2]
    assert sample(torch.tensor([[-INF, 0.0, -INF], [-INF, -INF, 0.0]])).tolist() == [1, 2]


def test_process_logits_order_temperature_before_min_p():
    """min-p after temperature: at T=2 the distribution flattens, so more tokens survive the same min_p."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    cold = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.4)
    hot = SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.4)
    assert kept(process_logits(logits, cold)) == [[0, 1]]
    assert kept(process_logits(logits, hot)) == [[0, 1, 2]]


def test_greedy_is_argmax_on_a_full_vocabulary():
    """The blocked argmax gives torch.argmax's index: the first on ties, the first NaN, -inf rows."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 262_144, generator=g)
    logits[0, [70_000, 5, 200_000]] = 9.0  # ties across blocks: the first wins
    logits[1, [3_000, 3_001]] = 9.0  # ties inside a block
    logits[2, [90_000, 10]] = float("nan")
    logits[3] = float("-inf")
    logits[4, 262_143] = 9.0  # the very last id
    assert greedy(logits).tolist() == logits.argmax(dim=-1).tolist() == [5, 3_000, 10, 0, 262_143]
    assert torch.equal(greedy(logits.bfloat16()), logits.bfloat16().argmax(dim=-1))
    assert greedy(logits[:, :1000]).tolist() == logits[:, :1000].argmax(dim=-1).tolist()  # small V: plain argmax
    odd = logits[:, :16 * 1024 + 1]  # large but not a multiple of the block: plain argmax too
    assert greedy(odd).tolist() == odd.argmax(dim=-1).tolist()


def test_greedy_params_apply_only_the_repetition_penalty():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert process_logits(logits, params, torch.tensor([[0]])).tolist() == [[1.5, 2.0, 1.0]]
    assert next_token(logits, params, torch.tensor([[0]])).tolist() == [1]


def test_greedy_params_never_sample():
    logits = torch.tensor([[0.0, 0.1]]).expand(1000, 2)  # a draw would pick id 0 about half the time
    assert next_token(logits, SamplingParams(temperature=0)).tolist() == [1] * 1000


def test_top_k_candidates_get_the_repetition_penalty():
    logits = torch.tensor([[2.0, 1.0, 0.0]])  # id 0 seen: 2 / 4 = 0.5 falls below id 1
    params = SamplingParams(top_k=1, repetition_penalty=4.0)
    assert next_token(logits, params, torch.tensor([[0]])).tolist() == [1]
    assert next_token(logits, params).tolist() == [0]


def test_fewer_allowed_tokens_than_top_k_draw_among_the_allowed():
    """A grammar may leave fewer than k tokens finite: the draw is among those, never an -inf one."""
    logits = torch.tensor([[0.0, -INF, 0.0, -INF, -INF]]).expand(200, 5)
    g = torch.Generator().manual_seed(0)
    assert set(next_token(logits, SamplingParams(top_k=3), generator=g).tolist()) == {0, 2}


@pytest.mark.parametrize(("top_k", "allowed", "drawn_over"), [
    (1, 2000, 1), (64, 2000, 64), (1024, 2000, 1024),  # the top k only, up to 1024
    (1025, 2000, 2000), (0, 2000, 2000),  # a larger top-k, or none: the whole vocabulary
    (64, 3, 3),  # fewer allowed than k (a grammar): those, not the -inf "ties"
])
def test_the_draw_sees_only_the_top_k_candidates(monkeypatch, top_k, allowed, drawn_over):
    """With a top-k up to 1024 the draw works on the k candidates, not on the whole vocabulary (the cost of a
    decode step at 262 144 ids); the distribution is the same (test_top_k_candidates_draw_...)."""
    import gemma3.generation.sampling as sampling

    widths, draw = [], sampling.sample

    def counting_sample(logits, generator=None):
        widths.append(logits.shape[-1])
        return draw(logits, generator)

    monkeypatch.setattr(sampling, "sample", counting_sample)
    logits = torch.randn(1, 2000, generator=torch.Generator().manual_seed(0))
    logits[:, allowed:] = -INF
    token = next_token(logits, SamplingParams(top_k=top_k, top_p=1.0))
    assert widths == [drawn_over]
    assert token.item() < allowed


def test_top_k_above_the_vocabulary_keeps_it_all_whatever_the_batch():
    logits = torch.tensor([[0.0, -INF]]).expand(70, 2)  # 70 rows > top_k 64 > 2 ids
    assert next_token(logits, SamplingParams()).tolist() == [0] * 70


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_tokens_stay_on_the_logits_device():
    logits = torch.randn(2, 32 * 1024, device="cuda")
    assert greedy(logits).device == logits.device
    assert greedy(logits).tolist() == logits.argmax(dim=-1).tolist()
    assert next_token(logits, SamplingParams()).device == logits.device


def test_next_token_accepts_bf16_logits():
    logits = torch.tensor([[0.0, 1.0, 9.0]], dtype=torch.bfloat16)
    assert next_token(logits, SamplingParams(temperature=0)).dtype == torch.int64
    assert next_token(logits, SamplingParams(top_k=1)).tolist() == [2]


# --- the checks around a decode step ---------------------------------------------------------------------------

NON_FINITE = ("the model produced non-finite logits (NaN or inf) after 3 generated token(s): its weights are "
              "probably non-finite (a corrupt or overflowed checkpoint), or the dtype cannot hold its activations "
              "(Gemma 3 needs bfloat16 or float32, never float16)")


@pytest.mark.parametrize("bad", [math.nan, INF, -INF])
def test_non_finite_logits_raise_one_line_naming_the_fp16_cache_only_when_there_is_one(bad):
    logits = torch.tensor([[0.0, bad]])
    with pytest.raises(Gemma3Error) as plain:
        check_finite(logits, 3, torch.float32)
    assert str(plain.value) == NON_FINITE
    with pytest.raises(Gemma3Error) as no_cache:
        check_finite(logits, 3)
    assert str(no_cache.value) == NON_FINITE
    with pytest.raises(Gemma3Error) as fp16:
        check_finite(logits, 3, torch.float16)
    assert str(fp16.value) == NON_FINITE + (", or a key or value beyond ±65504 overflowed the float16 KV cache "
                                            "(try --kv-cache-dtype float32)")


def test_finite_logits_pass_even_when_their_sum_overflows_their_own_dtype():
    check_finite(torch.zeros(1, 2), 0, torch.float16)
    check_finite(torch.full((1, 4), 60_000.0, dtype=torch.float16), 0)  # summed in float32: 240 000, no inf


def test_tokenizer_vocab_is_its_length_or_none():
    assert tokenizer_vocab(["a", "b", "c"]) == 3
    assert tokenizer_vocab(object()) is None


def test_mask_padding_sets_the_rows_past_the_vocabulary_to_minus_inf_in_place():
    logits = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5)  # (..., V): not just (B, V)
    assert mask_padding(logits, 3) is logits
    assert kept(logits.view(-1, 5)) == [[0, 1, 2]] * 6
    assert logits[..., :3].tolist() == torch.arange(30, dtype=torch.float32).view(2, 3, 5)[..., :3].tolist()


@pytest.mark.parametrize("vocab", [None, 5, 6])
def test_mask_padding_leaves_logits_alone_without_padding_rows(vocab):
    logits = torch.arange(10, dtype=torch.float32).view(2, 5)
    assert mask_padding(logits, vocab) is logits
    assert logits.tolist() == torch.arange(10, dtype=torch.float32).view(2, 5).tolist()


# --- validation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "temperature must be >= 0 (0 means greedy), got -0.1"),
        ("temperature", 1e-9, "temperature must be 0 (greedy) or in [1e-05, 10000], got 1e-09"),
        ("temperature", 10001, "temperature must be 0 (greedy) or in [1e-05, 10000], got 10001"),
        ("temperature", math.nan, "temperature must be a finite number, got nan"),
        ("temperature", math.inf, "temperature must be a finite number, got inf"),
        ("temperature", True, "temperature must be a finite number, got True"),
        ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
        ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        ("top_p", math.nan, "top_p must be a finite number, got nan"),
        ("top_k", -1, "top_k must be >= 0 (0 disables it), got -1"),
        ("top_k", 2.5, "top_k must be an integer, got 2.5"),
        ("top_k", True, "top_k must be an integer, got True"),
        ("min_p", -0.1, "min_p must be in [0, 1], got -0.1"),
        ("min_p", 1.1, "min_p must be in [0, 1], got 1.1"),
        ("min_p", math.inf, "min_p must be a finite number, got inf"),
        ("repetition_penalty", 0.0, "repetition_penalty must be in [0.001, 1000] (1 disables it), got 0.0"),
        ("repetition_penalty", 1001, "repetition_penalty must be in [0.001, 1000] (1 disables it), got 1001"),
        ("repetition_penalty", -1.0, "repetition_penalty must be in [0.001, 1000] (1 disables it), got -1.0"),
        ("repetition_penalty", "1.2", "repetition_penalty must be a finite number, got '1.2'"),
    ],
)
def test_invalid_params_raise_one_line_naming_the_field(field, value, message):
    with pytest.raises(Gemma3Error) as error:
        SamplingParams(**{field: value})
    assert str(error.value) == message


def test_defaults_are_gemma3s():
    params = SamplingParams()
    assert (params.temperature, params.top_k, params.top_p, params.min_p, params.repetition_penalty) == (
        1.0, 64, 0.95, 0.0, 1.0)
    assert not params.greedy and SamplingParams(temperature=0).greedy
    SamplingParams(temperature=0, top_k=0, top_p=1.0, min_p=1.0, repetition_penalty=0.5)  # edges are valid
    SamplingParams(temperature=1e-5, min_p=0.0, repetition_penalty=1e-3)  # both ends of each range are valid
    SamplingParams(temperature=1e4, repetition_penalty=1e3)
    SamplingParams(temperature=2, top_p=1, min_p=1, repetition_penalty=3)  # ints are numbers too


# --- equality with transformers ---------------------------------------------------------------------------------

def random_case(seed: int, batch: int = 3, vocab: int = 1000, history: int = 40):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 4
    prev_ids = torch.randint(0, vocab, (batch, history), generator=g)
    return logits, prev_ids


@pytest.mark.parametrize("seed", range(3))
def test_each_transform_matches_transformers(seed):
    logits, prev_ids = random_case(seed)
    pairs = [
        (apply_repetition_penalty(logits, prev_ids, 1.3), RepetitionPenaltyLogitsProcessor(1.3)),
        (apply_repetition_penalty(logits, prev_ids, 0.7), RepetitionPenaltyLogitsProcessor(0.7)),
        (apply_temperature(logits, 0.7), TemperatureLogitsWarper(0.7)),
        (apply_top_k(logits, 64), TopKLogitsWarper(64)),
        (apply_top_p(logits, 0.95), TopPLogitsWarper(0.95)),
        (apply_top_p(logits, 0.3), TopPLogitsWarper(0.3)),
        (apply_min_p(logits, 0.05), MinPLogitsWarper(0.05)),
        (apply_min_p(logits, 0.5), MinPLogitsWarper(0.5)),
    ]
    for ours, processor in pairs:
        assert torch.equal(ours, processor(prev_ids, logits.clone())), processor


def hf_processors(params: SamplingParams):
    """The LogitsProcessorList that transformers' `generate()` builds for these params, from its own code."""
    config = GenerationConfig(
        do_sample=not params.greedy, temperature=params.temperature or 1.0, top_k=params.top_k,
        top_p=params.top_p, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
    )
    model = SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=False),
                            _merge_criteria_processor_list=lambda default, custom: default)
    return GenerationMixin._get_logits_processor(model, config, input_ids_seq_length=40)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.6, top_k=20, top_p=0.8, min_p=0.02, repetition_penalty=1.2),
        SamplingParams(temperature=1.7, top_k=0, top_p=1.0, min_p=0.1, repetition_penalty=0.9),
        SamplingParams(temperature=0, repetition_penalty=1.5),
    ],
)
def test_pipeline_matches_transformers_generate(params):
    logits, prev_ids = random_case(7)
    processors = hf_processors(params)
    assert len(processors) > 0
    assert torch.equal(process_logits(logits, params, prev_ids), processors(prev_ids, logits.clone()))


# --- reproducibility --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [SamplingParams(temperature=1.5, top_k=0, top_p=1.0),  # the whole vocabulary
                                    SamplingParams(temperature=1.5)])  # the top-k candidates
def test_same_seed_same_tokens_whatever_the_global_rng(params):
    logits, prev_ids = random_case(0, batch=4, vocab=500)

    def draws(seed, global_seed):
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(global_seed)
            return torch.stack([next_token(logits, params, prev_ids, g) for _ in range(20)])

    assert torch.equal(draws(1234, 0), draws(1234, 1))
    assert not torch.equal(draws(1234, 0), draws(4321, 0))


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    tokens = next_token(logits, SamplingParams(top_k=0, top_p=0.6), generator=g)
    counts = torch.bincount(tokens, minlength=4) / len(tokens)
    assert counts[2:].sum() == 0
    assert abs(counts[0].item() - 0.5 / 0.8) < 0.03


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7, top_k=5, top_p=0.8),
                                    SamplingParams(temperature=1.3, top_k=20, top_p=1.0, min_p=0.05,
                                                   repetition_penalty=1.3)])
def test_top_k_candidates_draw_from_the_full_pipelines_distribution(params):
    """next_token filters and draws among the top-k candidates only: the tokens it can return and their
    frequencies are those of softmax(process_logits(...)) over the whole vocabulary."""
    logits, prev_ids = random_case(3, batch=1, vocab=2000)
    logits = logits * 4
    # ties at the k-th value are kept, as in HF
    logits[0, 1] = logits[0, 0] = torch.topk(logits[0], params.top_k).values[-1]
    expected = process_logits(logits, params, prev_ids).softmax(-1)[0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([next_token(logits, params, prev_ids, g) for _ in range(6000)]).squeeze(1)
    counts = torch.bincount(draws, minlength=logits.shape[1]).float() / len(draws)
    assert set(draws.tolist()) <= set(expected.nonzero().squeeze(1).tolist())
    assert (counts - expected).abs().max() < 0.025
