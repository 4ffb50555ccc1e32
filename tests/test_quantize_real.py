"""Accuracy of the quantized paths on the real 270M: perplexity and KL divergence against fp32 on a long
held-out text (crossing the 512-token sliding window), and greedy tokens against bf16.

The text is CPython's own documentation (`pydoc_data.topics`, part of every standard library): real English
prose with code, not anything the repository trains on. Every model reads it through the KV cache in
512-token chunks, where products take the dequantized GEMM (the weights' exact values); the file's own
blocks are also read 32 tokens at a time, so every product takes the decode kernel (up to 32 rows go to it, 8 a
call, each row's activation rounded to int16 per 32 values on its own), which is what generation runs.
"""

from __future__ import annotations

import math

import pytest
import torch

from gemma3.kv_cache import KVCache
from gemma3.loading import build_model, load_weights
from reference import native_model
from gemma3.accel.quantize import MAX_DECODE_ROWS as KERNEL_ROWS  # rows that still take the kernel

TOKENS = 3072
CHUNK = 8  # bf16: its native kernel's rows


def held_out_ids(tokenizer, n: int) -> list[int]:
    """The first n tokens of CPython's pydoc topics, in a fixed order."""
    from gemma3.eval.perplexity import pydoc_ids

    return pydoc_ids(tokenizer, n)


def build(gguf_path, quantize, dtype=torch.float32):
    """The model as generation runs it (Generator swaps in the same packed and fused modules)."""
    config, state, _, _ = load_weights(gguf_path, dtype, progress=False, quantize=quantize)
    return native_model(build_model(config, state))


@torch.inference_mode()
def evaluate(reference, models: dict, ids: list[int], chunk: int = 512, kernel_chunk: int = CHUNK) -> dict:
    """Per model: perplexity over `ids` and mean KL(reference ‖ model) per token; the reference's too.
    `models` maps a name to (model, rows per forward): 512 for the GEMM path, `kernel_chunk` for the kernels."""
    config = reference.config
    everyone = {"reference": (reference, chunk), **models}
    caches = {name: KVCache(config, 1, len(ids) + 1, next(model.parameters()).dtype)
              for name, (model, _) in everyone.items()}
    nll = dict.fromkeys(everyone, 0.0)
    kl = dict.fromkeys(everyone, 0.0)
    count = 0
    for start in range(0, len(ids) - 1, chunk):
        tokens = ids[start:start + chunk]
        targets = torch.tensor(ids[start + 1:start + 1 + chunk])
        n = len(targets)
        ref = None
        for name, (model, rows) in everyone.items():
            parts = [model(torch.tensor([tokens[i:i + rows]]), cache=caches[name]).logits[0].float()
                     for i in range(0, len(tokens), rows)]
            logp = torch.log_softmax(torch.cat(parts)[:n], dim=-1)
            del parts
            nll[name] -= logp.gather(1, targets[:, None]).sum().item()
            if ref is None:
                ref = logp
            else:
                kl[name] += (ref.exp() * (ref - logp)).sum().item()
        count += n
    return {name: {"ppl": math.exp(nll[name] / count), "kl": kl[name] / count} for name in everyone}


@pytest.fixture(scope="module")
def real_tokenizer_ids(real_270m):
    return held_out_ids(real_270m[1], TOKENS)


@pytest.fixture(scope="module")
def scores(gguf_path, real_tokenizer_ids):
    """fp32 = the file dequantized (its exact weights); native = its own blocks through the decode kernel (its
    prefill GEMM uses the exact weights: tests/test_quantize.py); int8 / int4 = quantized from fp32 at load;
    bf16 = the float model in bf16."""
    native = build(gguf_path, None)
    # bf16 is read 8 tokens at a time too, as generation runs it (the native bf16 kernel): on a CPU without
    # AVX-512 BF16 the 512-row bf16 GEMM takes 3x as long, for the same perplexity to 0.05 % (measured)
    models = {"native (kernel)": (native, KERNEL_ROWS),
              "int8": (build(gguf_path, "int8"), 512), "int4": (build(gguf_path, "int4"), 512),
              "bf16": (build(gguf_path, "none", torch.bfloat16), CHUNK)}
    out = evaluate(build(gguf_path, "none"), models, real_tokenizer_ids)
    print("\n" + "\n".join(f"{name:16} ppl {v['ppl']:.4f}  KL vs fp32 {v['kl']:.2e}" for name, v in out.items()))
    return out


def test_native_q4_k_m_is_within_0p2_percent_of_its_exact_weights(scores):
    """The same weights as the fp32 model (the file dequantized): only the activation rounding differs.
    (llama.cpp's own native path on this file: +0.67 %, measured by the issue's author.)"""
    assert abs(scores["native (kernel)"]["ppl"] / scores["reference"]["ppl"] - 1) < 0.002
    assert scores["native (kernel)"]["kl"] < 1e-4


def test_int8_perplexity_within_0p5_percent_of_bf16(scores):
    assert abs(scores["int8"]["ppl"] / scores["bf16"]["ppl"] - 1) < 0.005


def test_int4_perplexity_within_3_percent_of_bf16(scores):
    """q/o/gate/up/down in Q4_1, each block fitted by least squares weighted by the importance matrix measured at
    load on gemma3/data/calibration.txt (not this text); k, v, the head and down_proj in 9 of the 18 layers (the
    ones llama.cpp's Q4_K_M gives ffn_down more bits) in Q8_0. Measured 2026-12-03 over the 3 072 tokens: +1.77 %
    over bf16 (12.4507 vs 12.2344), KL from fp32 0.025; with down_proj at Q4_1 everywhere +3.1 %, without the
    importance matrix +6.45 %, with gguf-py's min/max Q4_1 everywhere +29.2 %. The weights here are the Q4_K_M
    file's, and q, k, gate and up are Q5_0 there: a 4-bit grid cannot hold a 5-bit one exactly."""
    assert abs(scores["int4"]["ppl"] / scores["bf16"]["ppl"] - 1) < 0.03
    assert scores["int4"]["kl"] < 0.04


@torch.inference_mode()
def test_int8_greedy_tokens_equal_bf16_or_part_at_a_near_tie(gguf_path, real_270m, passage):
    """64 greedy tokens of int8 (as generation runs it: the fused step over its fp16 KV cache) against bf16 on a
    fixed prompt. Free-running, the two part for good at their first disagreement, so they are also compared
    along bf16's own tokens, fed to both: at each of the 64 steps int8's argmax is bf16's, or bf16's two best
    logits there are within the int8 error (the test prints every such step and its margin). On this prompt
    bf16's very first token is an exact tie (21.875 twice, bf16 logits being coarse), so the free run parts at
    token 0 whatever int8 does."""
    from gemma3.accel.fused_step import FusedDecodeStep
    from gemma3.generation.generator import GenerationConfig, Generator
    from gemma3.generation.sampling import SamplingParams

    tokenizer = real_270m[1]
    prompt = tokenizer.encode(passage)[:200]
    config = GenerationConfig(max_new_tokens=64, sampling=SamplingParams(temperature=0.0), stop_token_ids=())
    bf16, int8 = build(gguf_path, "none", torch.bfloat16), build(gguf_path, "int8")
    int8_gen = Generator(int8, tokenizer)
    assert int8_gen.cache_dtype(1) == torch.float16
    ours = int8_gen.generate(prompt, config).token_ids
    ref = Generator(bf16, tokenizer).generate(prompt, config).token_ids
    free = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    print(f"\nfree-running, int8 and bf16 {'agree for all 64 tokens' if free is None else f'part at token {free}'}")

    cache_b = KVCache(bf16.config, 1, len(prompt) + 64, torch.bfloat16)
    cache_q = KVCache(int8.config, 1, len(prompt) + 64, torch.float16)
    b = bf16(torch.tensor([prompt]), cache=cache_b, logits_to_keep=1).logits[0, -1].float()
    q = int8(torch.tensor([prompt]), cache=cache_q, logits_to_keep=1).logits[0, -1]
    fused = FusedDecodeStep(int8, cache_q)
    parts = []
    for i, token in enumerate(ref):
        if int(q.argmax()) != int(b.argmax()):
            top = b.topk(2).values
            parts.append((i, round((top[0] - top[1]).item(), 3)))
        if i + 1 < len(ref):
            b = bf16(torch.tensor([[token]]), cache=cache_b, logits_to_keep=1).logits[0, -1].float()
            q = fused(token)[0]
    print(f"along bf16's tokens, int8's argmax differs at {len(parts)} of 64 steps (step, bf16's top-2 margin): "
          f"{parts}")
    # Measured (twice, same machine: the kernels and thread count fixed, so the same result each run): int8 differs
    # at 1 step of 64, step 0, where bf16's top two logits are an exact tie. bf16 has one more exact tie along these
    # 64 steps (step 22; the next closest margins are 0.125, int8's logits being up to ~0.45 from bf16's), and
    # which of two tied tokens int8 prefers is decided by its rounding, which another CPU's kernel path (AVX2 or
    # AVX-512) may do differently: so 2, one per exact tie. A real error in the int8 path moves far more steps.
    assert all(margin < 0.5 for _, margin in parts) and len(parts) <= 2, parts


@torch.inference_mode()
def test_fused_decode_step_scores_text_as_the_module_steps_do(gguf_path, real_tokenizer_ids):
    """Generation's decode step for the file's own blocks (gemma3.accel.fused_step: the whole step in one native
    call) against the same one-token steps through the modules, over 576 held-out tokens fed one at a time
    (crossing the 512-token window): the same logits, bit for bit, at every step (they call the same functions,
    GELU included, in the same order).

    Third, the fused step over the float16 KV cache generation gives it (Generator.cache_dtype), against the
    fp32 module steps: the cost of storing keys and values in fp16. Measured 2026-12-03: mean NLL -0.0014 %
    (3.0610737 vs 3.0611151), mean KL 6.4e-7 per token (int8 weights: 7.2e-4, bf16: 7.5e-4, in `scores`), the
    worst logit 9.9e-4 of the range apart."""
    from gemma3.accel.fused_step import FusedDecodeStep

    model = build(gguf_path, None)
    ids = real_tokenizer_ids[:576]
    caches = [KVCache(model.config, 1, len(ids)), KVCache(model.config, 1, len(ids)),
              KVCache(model.config, 1, len(ids), torch.float16)]
    plain, ours, half = [model(torch.tensor([ids[:1]]), cache=c, logits_to_keep=1).logits[:, -1] for c in caches]
    fused, fused_half = FusedDecodeStep(model, caches[1]), FusedDecodeStep(model, caches[2])
    nll, kl, worst, differ = [0.0, 0.0, 0.0], [0.0, 0.0], [0.0, 0.0], 0
    for i, token in enumerate(ids[1:]):
        logp = [torch.log_softmax(x[0].double(), dim=-1) for x in (plain, ours, half)]
        for j in range(3):
            nll[j] -= logp[j][token].item()
        for j, other in enumerate((ours, half)):
            kl[j] += (logp[0].exp() * (logp[0] - logp[j + 1])).sum().item()
            worst[j] = max(worst[j], float((plain - other).abs().max() / plain.abs().max()))
        differ += int(not torch.equal(plain, ours))  # steps whose logits are not the same bits
        if i + 2 < len(ids):
            plain = model(torch.tensor([[token]]), cache=caches[0], logits_to_keep=1).logits[:, -1]
            ours, half = fused(token), fused_half(token)
    n = len(ids) - 1
    for j, name in ((1, "fused"), (2, "fused, fp16 cache")):
        print(f"\n{name} vs module steps over {n} tokens: mean NLL {nll[j] / n:.7f} vs {nll[0] / n:.7f}, mean KL "
              f"{kl[j - 1] / n:.2e}, worst |Δlogit| / range {worst[j - 1]:.2e}")
    assert differ == 0 and nll[1] == nll[0] and kl[0] == 0 and worst[0] == 0
    # the fp16 cache: within 0.01 % of the fp32 steps' NLL, and its mean KL under 1/70 of int8's
    assert abs(nll[2] / nll[0] - 1) < 1e-4
    assert kl[1] / n < 1e-5 and worst[1] < 1e-2
