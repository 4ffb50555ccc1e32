"""`gemma3 generate / chat / perplexity` as a user runs them: real output on the embedded model, and bad
input answered with one line on stderr, exit status 2 and no traceback."""

from __future__ import annotations

import io
import json

import pytest
import torch

from gemma3.cli import main
from gemma3.config import Gemma3Config, hybrid_layer_types
from gemma3.tokenizer import Tokenizer
from gemma3.weights.hf import save_hf
from reference import random_model


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, official_tokenizer):
    """A small random Gemma 3 with the real tokenizer and a 64-token context."""
    config = Gemma3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          head_dim=8, sliding_window=8, layer_types=hybrid_layer_types(2), max_position_embeddings=64)
    directory = tmp_path_factory.mktemp("tiny")
    save_hf(directory, config, random_model(config).state_dict(), dtype=torch.float32,
            tokenizer_json=official_tokenizer / "tokenizer.json")
    return directory


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-k", "-1"], "top_k must be >= 0"),
    (["--min-p", "1.5"], "min_p must be in [0, 1]"),
    (["-n", "0"], "max_new_tokens must be an integer >= 1"),
])
def test_bad_sampling_flags(capsys, flags, message):
    code, out, err = run(capsys, "generate", "Hello", *flags)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_empty_prompt_and_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "")
    assert code == 2 and "the prompt is empty" in err
    code, _, err = run(capsys, "generate", "-f", str(tmp_path / "nope.txt"))
    assert code == 2 and "nope.txt: cannot read prompt" in err
    code, _, err = run(capsys, "generate", "-m", str(tmp_path / "missing.gguf"), "Hi")
    assert code == 2 and "missing.gguf" in err and len(err.strip().splitlines()) == 1


def test_prompt_longer_than_context(capsys, tiny_dir):
    code, out, err = run(capsys, "generate", "-m", str(tiny_dir), "--quiet", "word " * 100)
    assert code == 2 and "but the model's context is 64 tokens" in err and "Traceback" not in err


def test_generate_json_on_embedded_model(capsys):
    code, out, err = run(capsys, "generate", "The capital of France is", "-n", "12", "--temperature", "0",
                         "--json", "--quiet")
    assert code == 0
    result = json.loads(out)
    assert result["prompt_tokens"] == 6 and len(result["token_ids"]) == 12
    assert result["finish_reason"] == "length"
    assert "Paris" in result["text"] or "capital" in result["text"]
    assert result["timings"]["decode_tok_s"] > 0 and result["timings"]["load_s"] > 0


def test_generate_streams_with_stop_string(capsys, tiny_dir):
    code, out, _ = run(capsys, "generate", "-m", str(tiny_dir), "--quiet", "Once upon a time", "-n", "20",
                       "--temperature", "0", "--json")
    full = json.loads(out)["text"]
    stop = full[3:6]
    code, out, _ = run(capsys, "generate", "-m", str(tiny_dir), "--quiet", "Once upon a time", "-n", "20",
                       "--temperature", "0", "--stop", stop)
    assert code == 0 and out == full[:full.index(stop)] + "\n"


def test_chat_from_piped_stdin(capsys, monkeypatch, tiny_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/reset\nSecond message\n/exit\nnever read\n"))
    code, out, err = run(capsys, "chat", "-m", str(tiny_dir), "-n", "5", "--temperature", "0", "--context", "64")
    assert code == 0
    assert len(out.splitlines()) == 2  # two replies, one line each
    assert "(conversation reset)" in err


def test_chat_message_longer_than_context_keeps_session(capsys, monkeypatch, tiny_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("word " * 80 + "\nshort one\n"))
    code, out, err = run(capsys, "chat", "-m", str(tiny_dir), "-n", "4", "--temperature", "0", "--context", "64",
                         "--quiet")
    assert code == 0 and "error: this message needs" in err and len(out.splitlines()) == 1


def test_perplexity(capsys, tmp_path, tiny_dir):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    code, out, _ = run(capsys, "perplexity", str(text), "-m", str(tiny_dir), "--context", "32", "--stride", "16",
                       "--json", "--quiet")
    assert code == 0
    result = json.loads(out)
    n_ids = len(Tokenizer.from_dir(tiny_dir).encode(text.read_text()))
    assert result["tokens"] == n_ids - 1  # every token but <bos> scored exactly once
    assert 1 < result["perplexity"] < 1e7
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(capsys, "perplexity", str(empty), "-m", str(tiny_dir))
    assert code == 2 and "the file is empty" in err
