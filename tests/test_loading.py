"""`gemma3.loading`: resolving sources, and real-weight parity with transformers on the embedded GGUF."""

from __future__ import annotations

import sys

import pytest
import torch

from gemma3.errors import CheckpointError
from gemma3.loading import load
from gemma3.weights.sources import EMBEDDED, resolve_source
from gemma3.weights.hf import save_hf

from test_hf_weights import TINY, tiny_state

PARAGRAPH = ("The Roman Empire was the post-Republican state of ancient Rome. It included large territorial holdings "
             "around the Mediterranean Sea in Europe, North Africa, and Western Asia, and was ruled by emperors. ")


# ---------------------------------------------------------------------- resolving
def test_default_is_the_embedded_gguf():
    resolved = resolve_source(None)
    assert resolved.kind == "gguf" and resolved.description == EMBEDDED and resolved.path.suffix == ".gguf"


def test_paths_and_directories(tmp_path, gguf_path):
    assert resolve_source(str(gguf_path)).kind == "gguf"
    save_hf(tmp_path / "hf", TINY, tiny_state())
    assert resolve_source(tmp_path / "hf").kind == "hf"
    assert resolve_source(tmp_path / "hf" / "config.json").path == tmp_path / "hf"
    single = tmp_path / "single"
    single.mkdir()
    (single / "m.gguf").symlink_to(gguf_path)
    assert resolve_source(single).path == single / "m.gguf"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt: not a GGUF file"):
        resolve_source(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        resolve_source(tmp_path)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        resolve_source(str(tmp_path / "missing.gguf"))


def test_hub_id_offline_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        resolve_source("google/gemma-3-270m")
    text = str(info.value)
    assert text.startswith("google/gemma-3-270m: ") and "cannot be reached" in text and "local" in text
    assert "\n" not in text


def test_hub_without_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"pip install 'gemma3\[hub\]'"):
        resolve_source("google/gemma-3-270m")


def test_load_an_hf_dir_without_tokenizer(tmp_path):
    save_hf(tmp_path / "hf", TINY, tiny_state())
    model, tokenizer, config = load(tmp_path / "hf", progress=False)
    assert tokenizer is None and config == TINY
    assert model(torch.tensor([[2, 5, 7]])).logits.shape == (1, 3, TINY.vocab_size)


# ---------------------------------------------------------------------- real weights vs transformers
@pytest.fixture(scope="module")
def ours(real_270m):
    model, tokenizer = real_270m  # conftest: loaded once per session, shared with the generation tests
    return model, tokenizer, model.config


@pytest.fixture(scope="module")
def reference(hf_270m):
    return hf_270m


@torch.no_grad()
def test_logits_match_transformers_past_the_sliding_window(ours, reference):
    model, tokenizer, config = ours
    ids = tokenizer.encode(PARAGRAPH * 16)
    assert len(ids) > 600 > config.sliding_window
    x = torch.tensor([ids[:640]])
    torch.testing.assert_close(model(x).logits, reference(x).logits, atol=1e-3, rtol=1e-4)


@torch.no_grad()
def test_64_greedy_tokens_match_transformers(ours, reference):
    from gemma3.generation.generator import GenerationConfig, Generator
    from gemma3.generation.sampling import SamplingParams

    model, tokenizer, _ = ours
    prompt = tokenizer.encode("The capital of France is")
    mine = Generator(model, tokenizer).generate(
        prompt, GenerationConfig(max_new_tokens=64, sampling=SamplingParams(temperature=0), stop_token_ids=()))
    theirs = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=64, min_new_tokens=64, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert mine.token_ids == theirs


def test_running_the_embedded_gguf_imports_neither_tokenizers_nor_safetensors():
    """Our own tokenizer engine and the GGUF reader need neither library: importing them would cost ~7 MB of a
    run's memory for nothing (tokenizers ~6, safetensors ~1; #10's peak RSS budget is 1.5x llama.cpp's)."""
    import subprocess

    from gemma3.text import native_bpe as bpe

    if bpe.library() is None:
        pytest.skip("the native tokenizer engine does not build here (HF tokenizers is the fallback)")
    code = ("import sys\nfrom gemma3.loading import load\nfrom gemma3.generation.generator import Generator, GenerationConfig\n"
            "model, tok, _ = load(None, progress=False, quantize=None)\n"
            "Generator(model, tok).generate('Hello', GenerationConfig(max_new_tokens=2))\n"
            "print(sorted(m for m in ('tokenizers', 'safetensors') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------- the checkpoint's own chat template
def template_marked(marker: str) -> str:
    """A chat template whose rendering says which file it came from."""
    return "{{ bos_token }}" + marker + "{% for m in messages %} <{{ m.role }}> {{ m.content }}{% endfor %}"


def test_a_directory_template_is_read_from_chat_template_jinja_before_tokenizer_config(tmp_path):
    """Where a checkpoint directory's template comes from, as transformers reads it (generation.md, "Chat";
    hf.py's save_hf removes a stale chat_template.jinja because it would win): chat_template.jinja, then
    tokenizer_config.json's `chat_template` (a string, or transformers' list of named templates: "default"),
    else None (the built-in Gemma 3 format). Each ChatTemplate names the file it was read from."""
    import json

    from gemma3.loading import chat_template_of
    from gemma3.weights.sources import ResolvedSource

    source = ResolvedSource("hf", tmp_path, str(tmp_path))
    assert chat_template_of(source) is None
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": template_marked("FROM-CONFIG")}), encoding="utf-8")
    template = chat_template_of(source)
    assert (template.text, template.origin) == (template_marked("FROM-CONFIG"), str(config))
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": template_marked("TOOLS")},
                                                    {"name": "default", "template": template_marked("DEFAULT")}]}),
                      encoding="utf-8")
    assert chat_template_of(source).text == template_marked("DEFAULT")
    (tmp_path / "chat_template.jinja").write_text(template_marked("FROM-JINJA"), encoding="utf-8")
    template = chat_template_of(source)
    assert (template.text, template.origin) == (template_marked("FROM-JINJA"), str(tmp_path / "chat_template.jinja"))


def test_a_gguf_template_is_its_metadata_only(tmp_path):
    """A GGUF's template is its `tokenizer.chat_template`; a chat_template.jinja or tokenizer_config.json lying
    next to the file is not part of it (llama.cpp reads the metadata alone)."""
    from gemma3.loading import chat_template_of
    from gemma3.weights.sources import ResolvedSource

    path = tmp_path / "m.gguf"
    (tmp_path / "chat_template.jinja").write_text(template_marked("BESIDE"), encoding="utf-8")
    source = ResolvedSource("gguf", path, str(path))
    template = chat_template_of(source, {"tokenizer.chat_template": template_marked("FROM-GGUF")})
    assert (template.text, template.origin) == (template_marked("FROM-GGUF"), f"{path} (tokenizer.chat_template)")
    assert chat_template_of(source, {}) is None and chat_template_of(source, {"tokenizer.chat_template": ""}) is None
