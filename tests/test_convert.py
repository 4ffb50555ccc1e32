"""`gemma3 convert`: what it writes loads in transformers (HF layout) and in gguf-py / transformers (GGUF),
and gives the same logits as our model on the source."""

from __future__ import annotations

import pytest
import torch

from gemma3.cli.weights import model_info
from gemma3.convert import convert
from gemma3.config import PRESETS
from gemma3.loading import load
from gemma3.weights.gguf.reader import GGUFFile
from reference import random_checkpoint

transformers = pytest.importorskip("transformers")

TEXT = "The Roman Empire was the post-Republican state of ancient Rome, ruled by emperors. " * 3


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.set_num_threads(2)
    return convert(None, tmp_path_factory.mktemp("convert") / "hf", to="hf", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def source_logits(hf_dir):
    model, tokenizer, _ = load(progress=False)
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        return ids, model(ids).logits


@torch.no_grad()
def test_hf_export_loads_in_transformers(hf_dir, source_logits, official_tokenizer):
    ids, expected = source_logits
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer(TEXT)["input_ids"] == ids[0].tolist()
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True) == \
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-3, rtol=1e-4)


@torch.no_grad()
def test_gguf_export_round_trip(hf_dir, source_logits, tmp_path):
    from gguf import GGUFReader

    ids, expected = source_logits
    path = convert(str(hf_dir), tmp_path / "f32.gguf", to="gguf", gguf_type="F32", progress=False)
    assert len(GGUFReader(path).tensors) == len(GGUFFile.open(path).tensors) == 236
    model, tokenizer, _ = load(path, progress=False)
    assert tokenizer.encode(TEXT) == ids[0].tolist()  # tokenizer arrays rebuilt from tokenizer.json
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-5)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    torch.testing.assert_close(reference(ids).logits, expected, atol=1e-3, rtol=1e-4)


@torch.no_grad()
def test_q8_0_export_within_quantisation_tolerance(source_logits, tmp_path):
    ids, expected = source_logits
    path = convert(None, tmp_path / "q8", to="gguf", gguf_type="Q8_0", progress=False)
    model, _, _ = load(path, progress=False)
    logits = model(ids).logits
    error = (logits - expected).abs()
    assert error.max() < 0.05 * expected.abs().max()
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_info_numbers():
    info = model_info(PRESETS["270m"])
    assert info["parameters"]["total"] == 268_098_176 and info["parameters"]["embedding"] == 167_772_160
    kv = info["kv_cache_bytes"]["bfloat16"]
    assert kv["per_token_global_layers"] == 3 * 2 * 256 * 2 and kv["per_token_sliding_layers"] == 15 * 2 * 256 * 2
    assert kv["full_context"] == (3 * 32768 + 15 * 512) * 2 * 256 * 2
    assert model_info(PRESETS["27b"])["parameters"]["total"] == 27_009_346_304


def test_gguf_export_carries_the_chat_template_and_a_model_name(tiny_hf_dir, tmp_path):
    from gemma3.weights.chat_template import GEMMA3_CHAT_TEMPLATE

    path = convert(str(tiny_hf_dir), tmp_path / "tiny.gguf", to="gguf", gguf_type="F32", progress=False)
    metadata = GGUFFile.open(path).metadata
    assert metadata["tokenizer.chat_template"] == GEMMA3_CHAT_TEMPLATE  # what the HF export carries too
    assert metadata["general.name"] == "Gemma 3 (custom)"  # never the local path it came from
    assert str(tmp_path) not in metadata["general.name"]


def test_gguf_export_of_the_embedded_model_names_it():
    from gemma3.convert import model_name

    assert model_name(PRESETS["270m"]) == "Gemma 3 270M"
    assert model_name(PRESETS["270m"], {"general.name": "Gemma 3 270m"}) == "Gemma 3 270m"


@pytest.mark.peers  # llama.cpp reads what we write: pytest -m peers (docs/development.md)
def test_llama_cpp_chat_gets_the_same_prompt_tokens_as_ours(tiny_hf_dir, tmp_path):
    """llama.cpp's chat completion on our exported GGUF formats the conversation with the template we wrote
    (before, without tokenizer.chat_template, it fell back to another format and answered junk)."""
    from gemma3.text.chat import render_chat
    from gemma3.text.tokenizer import Tokenizer
    from reference import llama_cpp_model, require_llama_cpp

    require_llama_cpp()
    path = convert(str(tiny_hf_dir), tmp_path / "tiny.gguf", to="gguf", gguf_type="F32", progress=False)
    llm = llama_cpp_model(path, n_ctx=64, n_threads=1)
    seen = []
    generate = llm.generate

    def recording(tokens, *args, **kwargs):
        seen.append(list(tokens))
        return generate(tokens, *args, **kwargs)

    llm.generate = recording
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0)
    ours = Tokenizer.from_dir(tiny_hf_dir).encode(render_chat(messages), add_bos=False)
    assert seen and seen[0] == ours


@pytest.fixture(scope="module")
def small_hf_dir(tmp_path_factory, official_tokenizer):
    """A tiny checkpoint whose rows are multiples of the 32-value quantization block."""
    return random_checkpoint(tmp_path_factory.mktemp("small"), official_tokenizer, hidden_size=64,
                             intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                             query_pre_attn_scalar=32)


@pytest.fixture(scope="module")
def k_quant_hf_dir(tmp_path_factory, official_tokenizer):
    """A tiny checkpoint where o (2 heads × 128) and down (intermediate 256) have rows of 256 values: Q4_K;
    q, k, v, gate and up read the hidden size of 64: Q5_0."""
    return random_checkpoint(tmp_path_factory.mktemp("kquant"), official_tokenizer, hidden_size=64,
                             intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                             query_pre_attn_scalar=128)


def check_quantized_export(source, path, gguf_type: str, formats) -> None:
    """Export `source` as `gguf_type` to `path`: it loads in its own blocks (no dequantization), with `formats(n
    layers)` as its block types, and the same logits as those weights dequantized; and llama.cpp loads it and
    gives close logits (where llama-cpp-python is installed)."""
    from gemma3.loading import load
    from gemma3.accel.quantize import quantized_formats

    path = convert(str(source), path, to="gguf", gguf_type=gguf_type, progress=False)
    native, tokenizer, config = load(path, quantize=None, progress=False)
    assert quantized_formats(native) == formats(config.num_hidden_layers)
    exact, _, _ = load(path, quantize="none", progress=False)
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        ours, reference = native(ids).logits[0], exact(ids).logits[0]
    # the kernel rounds activations to int16 per 32 values: ~1e-4 of the largest logit at most on random weights
    torch.testing.assert_close(ours, reference, rtol=1e-3, atol=5e-4 * reference.abs().max().item())
    from reference import llama_cpp_model

    llm = llama_cpp_model(path, n_ctx=64, n_threads=1, logits_all=True)
    llm.eval(ids[0].tolist())
    theirs = torch.tensor(llm.scores[:ids.shape[1]])
    # llama.cpp rounds activations to int8 per block (and keeps its KV cache in f16): close, not equal
    torch.testing.assert_close(theirs, reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


@pytest.mark.peers  # llama.cpp reads what we write: pytest -m peers (docs/development.md)
@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_quantized_gguf_export_runs_in_its_own_blocks_here_and_in_llama_cpp(small_hf_dir, tmp_path, gguf_type):
    check_quantized_export(small_hf_dir, tmp_path / f"small-{gguf_type}.gguf", gguf_type,
                           lambda layers: {gguf_type: 1 + 7 * layers})


@pytest.mark.peers  # llama.cpp reads what we write: pytest -m peers (docs/development.md)
def test_q4_k_export_runs_in_its_own_blocks_here_and_in_llama_cpp(k_quant_hf_dir, tmp_path):
    check_quantized_export(k_quant_hf_dir, tmp_path / "k.gguf", "Q4_K",
                           lambda layers: {"Q4_K": 2 * layers, "Q5_0": 5 * layers, "Q8_0": 1})


def test_the_cli_offers_every_type_the_writer_writes():
    from gemma3.cli.weights import GGUF_TYPES
    from gemma3.weights.gguf.writer import WRITABLE_TYPES

    assert GGUF_TYPES == WRITABLE_TYPES
