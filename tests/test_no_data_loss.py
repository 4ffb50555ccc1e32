"""No command deletes or overwrites what it did not create (docs/security.md, "Our own files").

Each path that lost a user's data before: the directory and its files are byte-identical after the refused
command, and `--overwrite` does what it says (replaces what the command writes, keeps everything else)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from gemma3.cli import main
from gemma3.loading import load
from gemma3.weights.lora import LoraSettings, write_adapter
from gemma3.weights.hf import save_hf
from reference import random_model
from test_train_support import tiny_config, tiny_tokenizer_file, write_corpus

TRAIN_ARCH = ["--init", "270m", "--vocab-size", "128", "--hidden-size", "32", "--intermediate-size", "64",
              "--num-hidden-layers", "2", "--num-attention-heads", "2", "--num-key-value-heads", "1", "--head-dim",
              "16", "--sliding-window", "8", "--layer-pattern", "SG", "--max-position-embeddings", "256",
              "--seq-len", "32", "--eval-every", "0", "--sample-every", "0", "--quiet"]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model (the tiny character tokenizer, so it loads in milliseconds) and a LoRA adapter for it."""
    root = tmp_path_factory.mktemp("models")
    model = random_model(tiny_config(), seed=3)
    save_hf(root / "base", model.config, model.state_dict(), torch.float32,
            tokenizer_json=tiny_tokenizer_file(root))
    g = torch.Generator().manual_seed(4)
    adapter = {}
    for i in range(model.config.num_hidden_layers):
        for name, (out_f, in_f) in {"q_proj": (32, 32), "v_proj": (16, 32)}.items():
            adapter[f"layers.{i}.self_attn.{name}.lora_A.weight"] = torch.randn(4, in_f, generator=g) * 0.1
            adapter[f"layers.{i}.self_attn.{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.1
    write_adapter(root / "adapter", adapter, LoraSettings(r=4, alpha=8, targets=("q_proj", "v_proj")),
                  str(root / "base"))
    return root


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A directory of someone's work: what must survive every refused command."""
    d = tmp_path / "precious"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("my notes\n")
    (d / "sub" / "results.csv").write_text("a,b\n1,2\n")
    return d


# ------------------------------------------------------------------------------------------------ merge-lora
def test_merge_lora_refuses_an_existing_directory(capsys, model_dir, user_dir):
    before = snapshot(user_dir)
    code, err = run(capsys, "merge-lora", model_dir / "adapter", "-m", model_dir / "base", "-o", user_dir, "--quiet")
    one_line_error(code, err, "already exists and is not empty", "--overwrite")
    assert snapshot(user_dir) == before


def test_merge_lora_overwrite_keeps_other_files(capsys, model_dir, user_dir):
    before = snapshot(user_dir)
    code, _ = run(capsys, "merge-lora", model_dir / "adapter", "-m", model_dir / "base", "-o", user_dir,
                  "--quiet", "--overwrite")
    assert code == 0
    after = snapshot(user_dir)
    assert {k: after[k] for k in before} == before  # the user's files are untouched
    merged, _, _ = load(user_dir, progress=False)
    lora, _, _ = load(model_dir / "base", progress=False, lora=model_dir / "adapter")
    for name, tensor in lora.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("target", ["cwd", "home", "adapter", "parent of the adapter"])
def test_merge_lora_refuses_targets_no_one_means(capsys, model_dir, tmp_path, monkeypatch, target):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    out = {"cwd": ".", "home": str(tmp_path / "home"), "adapter": model_dir / "adapter",
           "parent of the adapter": model_dir}[target]
    before = snapshot(model_dir)
    code, err = run(capsys, "merge-lora", model_dir / "adapter", "-m", model_dir / "base", "-o", out, "--overwrite",
                    "--quiet")
    one_line_error(code, err, "-o")
    assert snapshot(model_dir) == before and not any((tmp_path / "home").iterdir())


# ---------------------------------------------------------------------------------------------------- convert
def test_convert_onto_its_own_source_is_refused(capsys, model_dir):
    before = snapshot(model_dir / "base")
    for extra in ([], ["--overwrite"]):  # fp32 weights silently replaced by bf16 before
        code, err = run(capsys, "convert", model_dir / "base", model_dir / "base", "--dtype", "bfloat16", "--quiet",
                        *extra)
        one_line_error(code, err, "is the source itself")
        code, err = run(capsys, "convert", model_dir / "base", model_dir, "--quiet", *extra)
        one_line_error(code, err, "contains the source")
    assert snapshot(model_dir / "base") == before


def test_convert_into_a_non_empty_directory(capsys, model_dir, user_dir):
    before = snapshot(user_dir)
    code, err = run(capsys, "convert", model_dir / "base", user_dir, "--quiet")
    one_line_error(code, err, "already exists and is not empty")
    assert snapshot(user_dir) == before
    # an older sharded checkpoint there would shadow the new weights: --overwrite removes its index and shards
    (user_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001.safetensors"}}))
    (user_dir / "model-00001.safetensors").write_bytes(b"old")
    code, _ = run(capsys, "convert", model_dir / "base", user_dir, "--quiet", "--overwrite", "--dtype", "float32")
    assert code == 0
    assert not (user_dir / "model.safetensors.index.json").exists() and not (user_dir / "model-00001.safetensors").exists()
    assert {k: v for k, v in snapshot(user_dir).items() if k in before} == before
    assert json.loads((user_dir / "config.json").read_text())["dtype"] == "float32"
    load(user_dir, progress=False)


def test_convert_to_an_existing_gguf_file(capsys, tiny_hf_dir, tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"someone else's file")
    code, err = run(capsys, "convert", tiny_hf_dir, target, "--to", "gguf", "--quiet")
    one_line_error(code, err, "already exists", "--overwrite")
    assert target.read_bytes() == b"someone else's file"
    code, _ = run(capsys, "convert", tiny_hf_dir, target, "--to", "gguf", "--quiet", "--overwrite")
    assert code == 0 and target.read_bytes()[:4] == b"GGUF"
    code, err = run(capsys, "convert", target, target, "--to", "gguf", "--quiet", "--overwrite")
    one_line_error(code, err, "is the source itself")


# ------------------------------------------------------------------------------------------------------ train
def test_train_into_an_existing_run_needs_resume_or_overwrite(capsys, tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    tok = tiny_tokenizer_file(tmp_path)
    run_dir = tmp_path / "run"
    args = [corpus, "-o", run_dir, "--tokenizer", tok, *TRAIN_ARCH, "--steps", "2", "--save-every", "1"]
    assert run(capsys, "train", *args)[0] == 0
    (run_dir / "my-notes.txt").write_text("keep me\n")
    before = snapshot(run_dir)
    code, err = run(capsys, "train", *args)  # a second run would mix checkpoints and truncate metrics.jsonl
    one_line_error(code, err, "already exists and is not empty", "--overwrite")
    assert snapshot(run_dir) == before
    code, err = run(capsys, "train", *args, "--resume", "--overwrite")
    one_line_error(code, err, "not both")
    assert snapshot(run_dir) == before
    # --overwrite: a fresh run there; the old run's checkpoints and metrics go, the user's file stays
    assert run(capsys, "train", *args[:-4], "--steps", "1", "--save-every", "1", "--overwrite")[0] == 0
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert steps == ["step-00000001"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1]
    assert (run_dir / "my-notes.txt").read_text() == "keep me\n"


def test_pruning_checkpoints_keeps_a_users_copy_beside_the_run(capsys, tmp_path):
    """--keep removes only the trainer's own checkpoints (its exact step-NNNNNNNN names with train_state.json):
    a user's copy of a checkpoint next to them, even one holding train_state.json, is never pruned."""
    corpus = write_corpus(tmp_path / "corpus")
    tok = tiny_tokenizer_file(tmp_path)
    run_dir = tmp_path / "run"
    args = [corpus, "-o", run_dir, "--tokenizer", tok, *TRAIN_ARCH, "--save-every", "1", "--keep", "1"]
    assert run(capsys, "train", *args, "--steps", "1")[0] == 0
    root = run_dir / "checkpoints"
    best = root / "step-00000000-best"  # sorts before every real step: the first to go by name order
    best.mkdir()
    for f in (root / "step-00000001").iterdir():
        (best / f.name).write_bytes(f.read_bytes())
    (root / "step-7").mkdir()  # not the trainer's pattern either
    (root / "step-7" / "notes.txt").write_text("mine\n")
    before = snapshot(best), snapshot(root / "step-7")
    assert run(capsys, "train", *args, "--steps", "3", "--resume")[0] == 0
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-00000000-best", "step-00000003", "step-7"]
    assert (snapshot(best), snapshot(root / "step-7")) == before


@pytest.mark.parametrize("where", ["cwd", "contains the data"])
def test_train_refuses_the_current_directory_and_its_data(capsys, tmp_path, monkeypatch, where):
    corpus = write_corpus(tmp_path / "corpus")
    tok = tiny_tokenizer_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = "." if where == "cwd" else corpus
    before = snapshot(tmp_path)
    code, err = run(capsys, "train", corpus, "-o", out, "--tokenizer", tok, *TRAIN_ARCH, "--steps", "1",
                    "--overwrite")
    one_line_error(code, err, "--out-dir")
    assert snapshot(tmp_path) == before


def test_leftovers_of_a_killed_tokenization_are_removed(tmp_path):
    from gemma3.text.tokenizer import Tokenizer
    from gemma3.train.data import TokenFile, data_fingerprint, expand_sources

    corpus = write_corpus(tmp_path / "corpus")
    tok = Tokenizer.from_file(tiny_tokenizer_file(tmp_path))
    cache = tmp_path / "cache"
    cache.mkdir()
    fingerprint = data_fingerprint(expand_sources([str(corpus)]), tok, "text")
    dead = 2**22 + 12345  # above the default pid_max: no process has it
    stale = cache / f"tokens-{fingerprint}.tokens.tmp-{dead}"
    stale.write_bytes(b"half a file")
    other = cache / "unrelated.tmp-1"
    other.write_bytes(b"not ours")
    TokenFile.build([str(corpus)], tok, cache, progress=False)
    assert not stale.exists() and other.exists()
    assert not list(cache.glob(f"*.tmp-{os.getpid()}"))
