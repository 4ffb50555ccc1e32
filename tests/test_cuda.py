"""Inference on a GPU (`--device cuda`): bf16 by default, the KV cache on the device, the same tokens as the CPU.

Skipped where CUDA is not present (CI and the CPU dev machine); run on a GPU machine with
``python -m pytest -q tests/test_cuda.py``."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


def test_generate_on_cuda_defaults_to_bf16_with_the_cache_on_the_device(gguf_path):
    from gemma3.generation.generator import GenerationConfig, Generator, _Run
    from gemma3.loading import load
    from gemma3.generation.sampling import SamplingParams

    model, tokenizer, _ = load(gguf_path, dtype=torch.bfloat16, device="cuda", progress=False)
    gen = Generator(model, tokenizer)
    config = GenerationConfig(max_new_tokens=32, sampling=SamplingParams(temperature=0))
    run = _Run(gen, [tokenizer.encode("The capital of France is")], config)
    assert all(k.device.type == "cuda" and k.dtype == torch.bfloat16 for k in run.cache.keys)
    result = gen.generate("The capital of France is", config)
    assert result.finish_reason == "length" and "Paris" in result.text


def test_cuda_greedy_tokens_match_the_cpu(gguf_path, passage):
    """fp32 on both devices: the same greedy tokens (bf16 kernels differ between devices by rounding)."""
    from gemma3.generation.generator import GenerationConfig, Generator
    from gemma3.loading import load
    from gemma3.generation.sampling import SamplingParams

    config = GenerationConfig(max_new_tokens=48, sampling=SamplingParams(temperature=0))
    tokens = {}
    for device in ("cpu", "cuda"):
        model, tokenizer, _ = load(gguf_path, dtype=torch.float32, device=device, progress=False)
        tokens[device] = Generator(model, tokenizer).generate(passage[:600], config).token_ids
    assert tokens["cuda"] == tokens["cpu"]


def test_cli_device_cuda(capsys, tiny_hf_dir, tmp_path):
    from gemma3.cli import main

    assert main(["generate", "Hello", "-m", str(tiny_hf_dir), "-n", "4", "--device", "cuda", "--json", "--quiet"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    assert main(["perplexity", str(text), "-m", str(tiny_hf_dir), "--context", "32", "--device", "cuda", "--quiet"]) == 0
    assert main(["generate", "Hello", "-m", str(tiny_hf_dir), "--device", f"cuda:{torch.cuda.device_count()}"]) == 2
