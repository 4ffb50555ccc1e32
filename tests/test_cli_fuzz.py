"""Every flag of every subcommand, given hostile values: the exit status is 0 or 2, never a traceback, a hang or
an unbounded allocation, and an error is said on one line.

The commands run in this process on tiny models (a character tokenizer, so each call takes well under a second)
from a fresh working directory per example, so relative paths land in a temporary directory. Values that name
legitimately long work (a billion training steps) are left out: they are not bad input. Under CI the examples
are derandomized, so a run is reproducible; locally hypothesis explores and remembers what failed."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gemma3.cli import main  # noqa: E402
from gemma3.weights.lora import LoraSettings, write_adapter  # noqa: E402
from gemma3.weights.hf import save_hf  # noqa: E402
from reference import random_model  # noqa: E402
from test_train_support import tiny_config, tiny_tokenizer_file, write_corpus  # noqa: E402

SECONDS = 60  # per command: far above what any of them takes here
EXAMPLES = int(os.environ.get("GEMMA3_FUZZ_EXAMPLES", "60"))

NUMBERS = ["-1", "0", "1", "2", "-0", "nan", "inf", "-inf", "1e309", "-1e309", "1e-320", str(2**63), str(2**64),
           "9" * 40, "0x10", "1_0", "3.5", "-3.5"]
TEXTS = ["", " ", "\t\n", "abc", "☃ 日本語 🤖", "%s %d {}", "--", "-", "<start_of_turn>", "<bos>", "a" * 5000,
         b"caf\xe9".decode("utf-8", "surrogateescape")]
PATHS = ["", ".", "..", "/", "/dev/zero", "/dev/null", "/nonexistent/x", "/etc/passwd", "/proc/self/status",
         "missing.gguf", "sub/../..", "existing.txt", "existing_dir"]
WRITE_PATHS = ["", ".", "..", "/", "/dev/null", "/nonexistent/x", "existing.txt", "existing_dir", "new_out",
               "new_out/deeper", "/proc/self"]
ANY = NUMBERS + TEXTS + PATHS


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_hf_dir):
    """Models, an adapter, data and a text for the commands to chew on."""
    root = tmp_path_factory.mktemp("fuzz")
    model = random_model(tiny_config(), seed=1)
    save_hf(root / "model", model.config, model.state_dict(), torch.float32, tokenizer_json=tiny_tokenizer_file(root))
    g = torch.Generator().manual_seed(2)
    adapter = {f"layers.{i}.self_attn.q_proj.lora_{ab}.weight": torch.randn(shape, generator=g) * 0.1
               for i in range(2) for ab, shape in (("A", (2, 32)), ("B", (32, 2)))}
    write_adapter(root / "adapter", adapter, LoraSettings(r=2, alpha=4, targets=("q_proj",)), str(root / "model"))
    write_corpus(root / "corpus", docs=3, repeat=2)
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    return {"model": str(root / "model"), "adapter": str(root / "adapter"), "corpus": str(root / "corpus"),
            "tokenizer": str(tiny_tokenizer_file(root)), "text": str(root / "text.txt"), "bpe_model": str(tiny_hf_dir)}


def commands(w: dict) -> dict[str, tuple[list[str], dict[str, list[str] | None]]]:
    """command -> (a valid, fast argv; {flag: hostile values, None for a switch}). "@N" names positional N."""
    model = ["-m", w["model"], "--quiet"]
    sampling = {"-n": NUMBERS, "--temperature": NUMBERS, "--top-k": NUMBERS, "--top-p": NUMBERS,
                "--min-p": NUMBERS, "--repetition-penalty": NUMBERS, "--seed": NUMBERS, "--stop": TEXTS}
    running = {"-m": PATHS + [w["adapter"], w["corpus"]], "--lora": PATHS + [w["adapter"], w["model"]],
               "--dtype": TEXTS + ["bfloat16", "float16"], "--device": TEXTS + ["cuda", "cuda:7", "meta", "cpu:0"],
               "-t": NUMBERS, "--quiet": None}
    arch = {f"--{name}": NUMBERS for name in ("hidden-size", "intermediate-size", "num-hidden-layers",
                                             "num-attention-heads", "num-key-value-heads", "head-dim",
                                             "sliding-window", "max-position-embeddings", "vocab-size")}
    train_base = [w["corpus"], "-o", "run", "--init", "270m", "--tokenizer", w["tokenizer"], "--vocab-size", "128",
                  "--hidden-size", "32", "--intermediate-size", "64", "--num-hidden-layers", "2",
                  "--num-attention-heads", "2", "--num-key-value-heads", "1", "--head-dim", "16",
                  "--sliding-window", "8", "--max-position-embeddings", "64", "--seq-len", "16", "--steps", "1",
                  "--batch-size", "2", "--eval-every", "1", "--eval-batches", "1", "--sample-tokens", "2",
                  "--save-every", "1", "--quiet"]
    # work-size flags (steps, batch, sample lengths): a huge value is legitimately long work, not bad input
    small = ["-1", "0", "1", "2", "nan", "inf", "abc", "", "3.5", "-" + str(2**64)]
    return {
        "generate": (["generate", "Once upon", "-n", "3", *model],
                     {"@0": ANY, "-f": PATHS, **sampling, "--json": None, **running}),
        "chat": (["chat", "-n", "3", "--context", "48", *model],
                 {"--system": TEXTS, "--context": NUMBERS, **sampling, **running}),
        "perplexity": (["perplexity", w["text"], "--context", "16", *model],
                       {"@0": PATHS, "--context": NUMBERS, "--stride": NUMBERS, "--json": None, **running}),
        "info": (["info", "-m", w["model"]], {"-m": PATHS + ["270m", "27b", w["adapter"]], "--json": None}),
        "convert": (["convert", w["bpe_model"], "out", "--quiet"],
                    {"@0": PATHS + [w["adapter"], w["model"]], "@1": WRITE_PATHS, "--to": TEXTS + ["gguf", "hf"],
                     "--dtype": TEXTS + ["float32"], "--gguf-type": TEXTS + ["F16", "Q8_0"], "--overwrite": None}),
        "merge-lora": (["merge-lora", w["adapter"], "-m", w["model"], "-o", "merged", "--quiet"],
                       {"@0": PATHS + [w["model"]], "-m": PATHS + [w["adapter"]], "-o": WRITE_PATHS,
                        "--dtype": TEXTS + ["bfloat16"], "--overwrite": None}),
        "train": (["train", *train_base],
                  {"@0": [p for p in PATHS if p != "/"] + [w["text"], w["model"]], "-o": WRITE_PATHS,
                   "-m": PATHS + [w["model"], w["adapter"]], "--init": PATHS + TEXTS + ["27b", "1b"],
                   **{flag: NUMBERS for flag in arch}, "--layer-pattern": TEXTS + NUMBERS + ["SSG", "GX"],
                   "--tokenizer": PATHS + [w["model"]], "--lora": None, "--lora-r": NUMBERS,
                   "--lora-alpha": NUMBERS, "--lora-dropout": NUMBERS, "--lora-targets": TEXTS + ["all-linear"],
                   "--seq-len": small, "--val-fraction": NUMBERS, "--text-field": TEXTS, "--data-cache": WRITE_PATHS,
                   "--steps": small, "-b": small, "--grad-accum": small, "--lr": NUMBERS, "--min-lr-ratio": NUMBERS,
                   "--warmup-steps": NUMBERS, "--weight-decay": NUMBERS, "--grad-clip": NUMBERS,
                   "--precision": TEXTS + ["bf16"], "--gradient-checkpointing": None, "--seed": NUMBERS,
                   "--device": TEXTS + ["cuda", "meta"], "--distributed": TEXTS + ["fsdp"],
                   "--eval-every": NUMBERS, "--eval-batches": small, "--sample-every": NUMBERS,
                   "--sample-prompt": TEXTS, "--sample-tokens": small, "--sample-temperature": NUMBERS,
                   "--save-every": NUMBERS, "--keep": NUMBERS, "--resume": None, "--overwrite": None,
                   "--json": None}),
    }


def build_argv(base: list[str], changes: list[tuple[str, str | None]]) -> list[str]:
    argv = list(base)
    positions = [i for i, a in enumerate(argv[1:], 1) if not a.startswith("-") and (i == 1 or not argv[i - 1].startswith("-")
                                                                                  or argv[i - 1] in ("--quiet",))]
    for flag, value in changes:
        if flag.startswith("@"):
            argv[positions[int(flag[1:])]] = value
        elif value is None:
            argv.append(flag)
        elif flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def fire(signum, frame):
        raise Timeout(f"took longer than {seconds} s")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_hostile(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as cwd:
        Path(cwd, "existing.txt").write_text("someone's file\n")
        Path(cwd, "existing_dir").mkdir()
        Path(cwd, "existing_dir", "keep.txt").write_text("keep\n")
        before = {p: p.read_bytes() for p in Path(cwd).rglob("*") if p.is_file()}
        monkeypatch.chdir(cwd)
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hello there\n/exit\n")))
        threads = torch.get_num_threads()
        try:
            with time_limit(SECONDS):
                try:
                    code = main(argv)
                except SystemExit as e:  # argparse
                    code = e.code
        finally:
            torch.set_num_threads(threads)
            monkeypatch.undo()
        # nothing that was there before was changed
        assert {p: p.read_bytes() for p in before} == before, argv
    return code, capsys.readouterr().err


def check(argv: list[str], capsys, monkeypatch) -> None:
    code, err = run_hostile(argv, capsys, monkeypatch)
    assert code in (0, 2), (argv, code, err[-2000:])
    assert "Traceback" not in err, (argv, err[-2000:])
    if code == 2:
        errors = [line for line in err.splitlines() if "error:" in line]
        assert errors, (argv, err[-2000:])
        for line in errors:
            assert line.startswith(("gemma3", "error:")), (argv, line)


@pytest.mark.parametrize("command", ["generate", "chat", "perplexity", "info", "convert", "merge-lora", "train"])
def test_hostile_flag_values(command, world, capsys, monkeypatch):
    base, flags = commands(world)[command]
    code, err = run_hostile(base, capsys, monkeypatch)
    assert code == 0, err  # the base command is valid: each example changes it by a few hostile values

    def pair(flag: str):
        return st.tuples(st.just(flag), st.just(None) if flags[flag] is None else st.sampled_from(flags[flag]))

    @settings(max_examples=EXAMPLES if command != "train" else max(5, EXAMPLES * 3 // 5), deadline=None,
              derandomize=bool(os.environ.get("CI")), suppress_health_check=list(HealthCheck), database=None
              if os.environ.get("CI") else hypothesis.settings.default.database)
    @given(st.lists(st.sampled_from(sorted(flags)), min_size=1, max_size=3, unique=True).flatmap(
        lambda chosen: st.tuples(*[pair(f) for f in chosen])))
    def examples(changes):
        ran.append(changes)
        check(build_argv(base, changes), capsys, monkeypatch)

    ran = []
    examples()
    assert len(ran) >= min(5, EXAMPLES), ran


def test_build_argv_replaces_positionals_and_flags():
    base = ["convert", "SRC", "OUT", "--quiet", "-n", "3"]
    assert build_argv(base, [("@1", "X"), ("-n", "9"), ("--json", None), ("--stop", "s")]) == \
        ["convert", "SRC", "X", "--quiet", "-n", "9", "--json", "--stop", "s"]
