"""The training loop on a tiny model: it learns, resumes exactly, survives a kill during a save, stops on a
non-finite loss keeping the last good checkpoint, and refuses a resume from a different config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gemma3.errors import CheckpointError
from gemma3.train import TrainConfig, TrainingError, train
from gemma3.train import checkpoint as ckpt
from gemma3.train.data import DataError
from gemma3.train.trainer import lr_at
from test_train_support import TINY_ARCH, tiny_tokenizer_file, write_corpus

torch.set_num_threads(2)
ARCH = {**TINY_ARCH, "layer_pattern": "SG"}


def config(tmp_path: Path, out: str = "run", **kw) -> TrainConfig:
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        write_corpus(corpus)
    base = dict(data=[str(corpus)], out_dir=str(tmp_path / out), init="270m", model_overrides=dict(ARCH),
                tokenizer=str(tiny_tokenizer_file(tmp_path)), seq_len=32, batch_size=4, steps=8, lr=1e-2,
                warmup_steps=2, val_fraction=0.2, eval_every=4, eval_batches=2, save_every=4, sample_tokens=8,
                progress=False, data_cache=str(tmp_path / "cache"), precision="fp32")  # the same on every CPU
    base.update(kw)
    return TrainConfig(**base)


def test_learns_and_writes_run_files(tmp_path):
    result = train(config(tmp_path, steps=30, eval_every=15, save_every=15))
    assert result.eval_losses[30] < result.eval_losses[0] - 1.0
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))
    assert (run / "loss.png").stat().st_size > 1000 or pytest.importorskip("matplotlib") is None
    assert (run / "samples.jsonl").exists()
    last = ckpt.latest_checkpoint(run)
    assert last.name == "step-00000030"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in last.iterdir()}


def test_checkpoint_loads_as_model_source(tmp_path):
    pytest.importorskip("gemma3.weights.hf")
    from gemma3.loading import load

    train(config(tmp_path, steps=2, eval_every=0, save_every=2))
    model, tokenizer, cfg = load(str(ckpt.latest_checkpoint(tmp_path / "run")))
    assert cfg.hidden_size == TINY_ARCH["hidden_size"] and tokenizer is not None
    saved = ckpt.read_model_state(ckpt.latest_checkpoint(tmp_path / "run"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k])


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    full = train(config(tmp_path, "full", grad_accum=2, batch_size=2))

    from gemma3.train.trainer import Trainer

    original = Trainer.train_step

    def crash_after_step_6(self):
        out = original(self)
        if self.step == 6:  # steps 5 and 6 ran but were never saved: they must be redone identically
            raise RuntimeError("simulated crash")
        return out

    monkeypatch.setattr(Trainer, "train_step", crash_after_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(tmp_path, "part", grad_accum=2, batch_size=2))
    monkeypatch.setattr(Trainer, "train_step", original)
    assert ckpt.latest_checkpoint(tmp_path / "part").name == "step-00000004"
    resumed = train(config(tmp_path, "part", grad_accum=2, batch_size=2, resume=True))
    assert resumed.losses == pytest.approx(full.losses[4:], rel=0, abs=1e-6)
    assert resumed.eval_losses[8] == pytest.approx(full.eval_losses[8], abs=1e-6)
    steps = [json.loads(l)["step"] for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(1, 9))  # the dead run's steps 5-6 were dropped from the log


def test_kill_during_save_leaves_latest_checkpoint_intact(tmp_path):
    cfg = config(tmp_path, steps=4, save_every=2, eval_every=0)
    script = textwrap.dedent(f"""
        import os, signal
        from gemma3.train import checkpoint, train, TrainConfig
        real = checkpoint.write_model_files
        calls = []
        def dying(directory, config, state):
            calls.append(1)
            real(directory, config, state)
            if len(calls) == 2:  # second save: weights half written, then the process is SIGKILLed
                path = directory / "model.safetensors"
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.write_model_files = dying
        train(TrainConfig(**{json.dumps(cfg.__dict__, default=str)!r}))
    """).replace("**'", "**json.loads('").replace("'))", "')))")
    proc = subprocess.run([sys.executable, "-c", "import json\n" + script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = tmp_path / "run"
    latest = ckpt.latest_checkpoint(run)
    assert latest.name == "step-00000002"
    assert not (run / "checkpoints" / "step-00000004").exists()
    assert all(torch.isfinite(t).all() for t in ckpt.read_model_state(latest).values())
    result = train(config(tmp_path, steps=4, save_every=2, eval_every=0, resume=True))
    assert result.step == 4 and ckpt.latest_checkpoint(run).name == "step-00000004"
    assert not list((run / "checkpoints").glob(".*tmp*"))  # the dead save's leftovers were cleaned up


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from gemma3.model import Gemma3Model

    original = Gemma3Model.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if kwargs.get("labels") is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Gemma3Model, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"loss is nan at step 3.*step-00000002") as info:
        train(config(tmp_path, steps=6, save_every=2, eval_every=0))
    assert "\n" not in str(info.value)
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-00000002"
    assert all(torch.isfinite(t).all() for t in ckpt.read_model_state(latest).values())


def test_resume_from_mismatched_config_is_one_line_error(tmp_path):
    train(config(tmp_path, steps=2, save_every=2, eval_every=0))
    bigger = {**ARCH, "hidden_size": 48}
    with pytest.raises(CheckpointError, match=r"mismatched model_config \(hidden_size=32 there, 48 here") as info:
        train(config(tmp_path, steps=4, eval_every=0, resume=True, model_overrides=bigger))
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="mismatched seq_len"):
        train(config(tmp_path, steps=4, eval_every=0, resume=True, seq_len=16))


def test_grad_accumulation_matches_bigger_batch(tmp_path):
    a = train(config(tmp_path, "a", steps=3, batch_size=4, eval_every=0, save_every=0))
    b = train(config(tmp_path, "b", steps=3, batch_size=1, grad_accum=4, eval_every=0, save_every=0))
    assert b.losses == pytest.approx(a.losses, abs=1e-5)


def test_sequence_longer_than_context_and_empty_data(tmp_path):
    with pytest.raises(DataError, match="longer than the model's context"):
        train(config(tmp_path, seq_len=1024))
    (tmp_path / "tiny.txt").write_text("ab", encoding="utf-8")
    with pytest.raises(DataError, match="fewer than 32 tokens"):
        train(config(tmp_path, data=[str(tmp_path / "tiny.txt")], val_fraction=0.0))


def test_cli_train_and_one_line_errors(tmp_path, capsys):
    from gemma3.cli import main

    corpus = write_corpus(tmp_path / "corpus")
    tok = tiny_tokenizer_file(tmp_path)
    args = [str(corpus), "-o", str(tmp_path / "cli"), "--init", "270m", "--tokenizer", str(tok), "--vocab-size", "128",
            "--hidden-size", "32", "--intermediate-size", "64", "--num-hidden-layers", "2", "--num-attention-heads",
            "2", "--num-key-value-heads", "1", "--head-dim", "16", "--sliding-window", "8", "--layer-pattern", "SG",
            "--max-position-embeddings", "256", "--seq-len", "32", "--steps", "2", "--eval-every", "0",
            "--save-every", "0", "--quiet", "--json"]
    assert main(["train", *args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["checkpoint"].endswith("step-00000002")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    assert main(["train", str(bad), *args[1:3], "--overwrite", *args[3:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.jsonl:2: malformed JSON" in err


# ------------------------------------------------------------------------------- resuming as people expect
def cli_args(tmp_path: Path, out: str = "cli") -> list[str]:
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        write_corpus(corpus)
    return [str(corpus), "-o", str(tmp_path / out), "--init", "270m", "--tokenizer", str(tiny_tokenizer_file(tmp_path)),
            "--vocab-size", "128", "--hidden-size", "32", "--intermediate-size", "64", "--num-hidden-layers", "2",
            "--num-attention-heads", "2", "--num-key-value-heads", "1", "--head-dim", "16", "--sliding-window", "8",
            "--layer-pattern", "SG", "--max-position-embeddings", "256", "--seq-len", "32", "--batch-size", "4",
            "--lr", "1e-2", "--warmup-steps", "2", "--eval-every", "0", "--sample-every", "0", "--save-every", "2",
            "--data-cache", str(tmp_path / "cache"), "--quiet"]


def test_resume_alone_reads_everything_from_the_checkpoint(tmp_path, capsys, monkeypatch):
    """`gemma3 train --resume -o RUN` with nothing else: model, data and flags come from the checkpoint, even
    from another working directory, and the run continues exactly."""
    from gemma3.cli import main

    assert main(["train", *cli_args(tmp_path, "full"), "--steps", "6"]) == 0
    assert main(["train", *cli_args(tmp_path, "part"), "--steps", "6"]) == 0
    part = tmp_path / "part" / "checkpoints"
    shutil.rmtree(part / "step-00000006")  # as if it had died after saving step 4
    shutil.rmtree(part / "step-00000004")
    (part / "latest").write_text("step-00000002\n")
    monkeypatch.chdir(tmp_path / "corpus")
    assert main(["train", "--resume", "-o", str(tmp_path / "part"), "--quiet"]) == 0
    capsys.readouterr()

    def train_losses(run):
        return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert train_losses(tmp_path / "part") == pytest.approx(train_losses(tmp_path / "full"), abs=1e-6)
    # --resume PATH alone: the run directory of PATH is where it goes on
    assert main(["train", "--resume", str(tmp_path / "part"), "--steps", "7", "--quiet"]) == 0
    assert ckpt.latest_checkpoint(tmp_path / "part").name == "step-00000007"


@pytest.mark.parametrize(("flag", "name"), [
    (["--seq-len", "16"], "--seq-len"), (["--seed", "5"], "--seed"), (["--hidden-size", "48"], "architecture"),
    (["--lora"], "--lora"), (["--val-fraction", "0.5"], "--val-fraction")])
def test_resume_flag_that_contradicts_the_checkpoint_names_it(tmp_path, capsys, flag, name):
    from gemma3.cli import main

    assert main(["train", *cli_args(tmp_path), "--steps", "2"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "-o", str(tmp_path / "cli"), *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert name in err and "the run was trained with" in err and len(err.splitlines()) == 1


def test_raising_steps_on_resume_keeps_the_learning_rate_continuous(tmp_path):
    """A run of 8 steps resumed to 16: the rate goes on from where it was (no jump back up the cosine) and
    reaches the floor at the new last step."""
    first = train(config(tmp_path, steps=8, save_every=4, eval_every=0, sample_every=0))
    assert first.step == 8
    train(config(tmp_path, steps=16, save_every=4, eval_every=0, sample_every=0, resume=True))
    rates = [json.loads(l)["lr"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"lr"' in l]
    assert len(rates) == 16
    cfg = config(tmp_path, steps=8)
    assert rates[:8] == pytest.approx([lr_at(s, cfg) for s in range(8)])
    floor = cfg.lr * cfg.min_lr_ratio
    assert rates[8] == pytest.approx(lr_at(8, cfg)) == pytest.approx(floor)  # where the 8-step schedule ended
    assert max(rates[8:]) <= rates[7] + 1e-12  # never back up
    # and the same rule mid-curve: stop at 4 of 8, go on to 12 from the rate step 4 had
    train(config(tmp_path, "mid", steps=4, save_every=4, eval_every=0, sample_every=0))
    state = json.loads((tmp_path / "mid" / "checkpoints" / "step-00000004" / "train_state.json").read_text())
    state["train_config"]["steps"] = 8  # as if the run had been planned for 8 steps and stopped at 4
    (tmp_path / "mid" / "checkpoints" / "step-00000004" / "train_state.json").write_text(json.dumps(state))
    train(config(tmp_path, "mid", steps=12, save_every=4, eval_every=0, sample_every=0, resume=True))
    mid = [json.loads(l)["lr"] for l in (tmp_path / "mid" / "metrics.jsonl").read_text().splitlines() if '"lr"' in l]
    planned = config(tmp_path, steps=8)
    assert mid[4] == pytest.approx(lr_at(4, planned))
    # a cosine from there to the floor at the new last step (12; the last step run is 11)
    import math
    assert mid[11] == pytest.approx(floor + (mid[4] - floor) * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b - 1e-12 for a, b in zip(mid[4:], mid[5:]))


def test_run_directory_is_a_model_source(tmp_path):
    from gemma3.loading import load

    train(config(tmp_path, steps=2, eval_every=0, save_every=2, sample_every=0))
    model, tokenizer, cfg = load(str(tmp_path / "run"), progress=False)
    saved = ckpt.read_model_state(ckpt.latest_checkpoint(tmp_path / "run"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    config_json = json.loads((ckpt.latest_checkpoint(tmp_path / "run") / "config.json").read_text())
    assert config_json["dtype"] == "float32"  # what the weights beside it are


def test_epochs_set_the_steps_from_the_packed_data(tmp_path, capsys):
    from gemma3.cli import main
    from gemma3.train import Trainer

    trainer = Trainer(config(tmp_path, steps=999, epochs=2.5, batch_size=3))
    sequences = len(trainer.train_set)
    assert trainer.cfg.steps == -(-5 * sequences // (2 * 3)) and trainer.cfg.steps != 999  # ceil(2.5 × n / 3)
    trainer.close()
    args = [a for a in cli_args(tmp_path, "both")]
    assert main(["train", *args, "--steps", "3", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--steps or --epochs, not both" in err
    for bad in ("0", "-1", "nan", "inf"):
        assert main(["train", *cli_args(tmp_path, f"bad{bad}"), "--epochs", bad]) == 2
        assert "epochs must be a number in (0, 10000]" in capsys.readouterr().err
