"""Two processes on CPU (gloo), launched by torchrun: DDP and FSDP2 give the loss curve of one process at the
same global batch, and FSDP2 checkpoints hold full tensors that resume."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma3.train import TrainConfig, train
from gemma3.train import checkpoint as ckpt
from test_train_support import TINY_ARCH, tiny_tokenizer_file, write_corpus

RUNNER = """
import json, sys
from gemma3.train import TrainConfig, train
train(TrainConfig(**json.loads(open(sys.argv[1]).read())))
"""


def settings(tmp_path: Path, out: str, **kw) -> dict:
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        write_corpus(corpus)
    base = dict(data=[str(corpus)], out_dir=str(tmp_path / out), init="270m",
                model_overrides={**TINY_ARCH, "layer_pattern": "SG"}, tokenizer=str(tiny_tokenizer_file(tmp_path)),
                seq_len=32, batch_size=4, steps=4, lr=1e-2, warmup_steps=1, val_fraction=0.2, eval_every=2,
                eval_batches=1, sample_every=0, save_every=2, progress=False, device="cpu",
                data_cache=str(tmp_path / "cache"))
    base.update(kw)
    return base


def torchrun(tmp_path: Path, cfg: dict, nproc: int = 2) -> None:
    (tmp_path / "runner.py").write_text(RUNNER, encoding="utf-8")
    cfg_file = tmp_path / f"{Path(cfg['out_dir']).name}.json"
    cfg_file.write_text(json.dumps(cfg), encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           str(tmp_path / "runner.py"), str(cfg_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(run: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["eval_loss"] for r in records if "eval_loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, global batch 4 (batch 2 × accumulation 2): the curve the others must reproduce."""
    tmp = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    try:
        train(TrainConfig(**settings(tmp, "single", batch_size=2, grad_accum=2)))
    finally:
        torch.set_num_threads(2)
    return tmp


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process(single, strategy):
    """2 processes × batch 2 = the single process's global batch 4, step by step and in held-out loss."""
    run = single / strategy
    torchrun(single, settings(single, strategy, batch_size=2, distributed=strategy))
    train_ref, eval_ref = losses(single / "single")
    train_got, eval_got = losses(run)
    assert train_got == pytest.approx(train_ref, abs=1e-4)
    assert eval_got == pytest.approx(eval_ref, abs=1e-4)
    # the checkpoint holds full (unsharded) tensors equal to the single-process run's
    ref = ckpt.read_model_state(ckpt.latest_checkpoint(single / "single"))
    got = ckpt.read_model_state(ckpt.latest_checkpoint(run))
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=1e-3)


def test_fsdp_resume_continues_the_curve(single):
    """An FSDP run resumed from its step-2 checkpoint reproduces the uninterrupted run's last steps."""
    cfg = settings(single, "fsdp_resume", batch_size=2, distributed="fsdp")
    torchrun(single, cfg)
    run = single / "fsdp_resume" / ckpt.CHECKPOINTS  # as if it had died after saving step 2
    shutil.rmtree(run / "step-00000004")
    (run / ckpt.LATEST).write_text("step-00000002\n", encoding="utf-8")
    torchrun(single, {**cfg, "resume": True})
    train_ref, _ = losses(single / "single")
    train_got, _ = losses(single / "fsdp_resume")
    assert train_got == pytest.approx(train_ref, abs=1e-4)
