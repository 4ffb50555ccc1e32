"""Every flag of every subcommand, given hostile values: the exit status is 0 or 2, never a traceback, a hang or
an unbounded allocation, and a failure is said in one line, the whole of stderr.

The commands run in this process on tiny models (a character tokenizer, so each call takes well under a second),
each example in a fresh tree of its own with cwd and HOME three levels down (a/b/c), so relative paths, `..`
included, land inside the test's temporary tree; every file in that tree (the models and data the commands read
included) is compared before and after. Values that name legitimately long work (a billion training steps) are
left out: they are not bad input. The examples are derandomized (tests/conftest.py's profile), so a run is
reproducible; HYPOTHESIS_PROFILE=explore draws fresh ones."""

from __future__ import annotations

import contextlib
import io
import os
import re
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
    return {"root": str(root), "model": str(root / "model"), "adapter": str(root / "adapter"), "corpus": str(root / "corpus"),
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


SANDBOX = Path("a", "b", "c")  # cwd and HOME of a command, three levels into its example's tree: "..",
# "sub/../.." and the like land inside the tree, where the snapshot sees them
WHOLE = 1 << 20  # files up to this size are compared byte for byte, larger ones (tiny_hf_dir's 16 MB) by stat


def snapshot(roots: list[Path]) -> dict[Path, bytes | tuple[int, int, int]]:
    files = {}
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                files[p] = p.read_bytes() if st.st_size <= WHOLE else (st.st_size, st.st_mtime_ns, st.st_ino)
    return files


def run_hostile(argv: list[str], capsys, monkeypatch, world: dict) -> tuple[int, str]:
    """Run argv in a fresh tree under the world's root (a/b/c the cwd and HOME, someone's files at every level),
    and check that no file the test's tree held before (the world's models, data and text included) was changed
    or removed, and that new files appear only inside the sandbox."""
    examples = Path(world["root"], "examples")
    examples.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=examples) as top:
        cwd = Path(top, SANDBOX)
        cwd.mkdir(parents=True)
        for level in (Path(top), Path(top, "a"), Path(top, "a", "b"), cwd):
            (level / "existing.txt").write_text(f"someone's file in {level.name}\n")
        Path(cwd, "existing_dir").mkdir()
        Path(cwd, "existing_dir", "keep.txt").write_text("keep\n")
        roots = [Path(world["root"]), Path(world["bpe_model"])]
        before = snapshot(roots)
        monkeypatch.chdir(cwd)
        monkeypatch.setenv("HOME", str(cwd))
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
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
        after = snapshot(roots)
        assert {p: after.get(p) for p in before} == before, argv  # nothing that was there changed or went away
        new = [p for p in after if p not in before and cwd not in p.parents]
        assert not new, (argv, new)  # and nothing was written outside the sandbox
    return code, capsys.readouterr().err


ERROR_LINE = re.compile(r"gemma3( [a-z-]+)?: error: [^\n]+\n")
CHAT_TURN_ERROR = re.compile(r"(gemma3 chat: )?error: [^\n]+\n")
WARNING_LINE = re.compile(r"warning: --threads \d+ is more than the \d+ cores available; using \d+\n")


def check(argv: list[str], capsys, monkeypatch, world: dict) -> None:
    code, err = run_hostile(argv, capsys, monkeypatch, world)
    assert code in (0, 2), (argv, code, err[-2000:])
    assert "Traceback" not in err, (argv, err[-2000:])
    if code != 0:  # stderr is the one line that says what is wrong, after at most the one-line warnings of flags
        # that were taken before it (`-t 4096`: "warning: --threads 4096 is more than the 2 cores ...; using 2")
        lines = err.splitlines(keepends=True)
        # chat says a failed turn as "error: ..." and goes on; piped, its exit status then says a turn failed
        error_line = CHAT_TURN_ERROR if argv[0] == "chat" else ERROR_LINE
        assert lines and error_line.fullmatch(lines[-1]), (argv, err[-2000:])
        assert all(WARNING_LINE.fullmatch(line) for line in lines[:-1]), (argv, err[-2000:])


@pytest.mark.parametrize("command", ["generate", "chat", "perplexity", "info", "convert", "merge-lora", "train"])
def test_hostile_flag_values(command, world, capsys, monkeypatch):
    base, flags = commands(world)[command]
    code, err = run_hostile(base, capsys, monkeypatch, world)
    assert code == 0, err  # the base command is valid: each example changes it by a few hostile values

    def pair(flag: str):
        return st.tuples(st.just(flag), st.just(None) if flags[flag] is None else st.sampled_from(flags[flag]))

    # derandomized, as the conftest profile says (HYPOTHESIS_PROFILE=explore for fresh examples)
    @settings(max_examples=EXAMPLES if command != "train" else max(5, EXAMPLES * 3 // 5), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.sampled_from(sorted(flags)), min_size=1, max_size=3, unique=True).flatmap(
        lambda chosen: st.tuples(*[pair(f) for f in chosen])))
    def examples(changes):
        ran.append(changes)
        check(build_argv(base, changes), capsys, monkeypatch, world)

    ran = []
    examples()
    assert len(ran) >= min(5, EXAMPLES), ran


def test_build_argv_replaces_positionals_and_flags():
    base = ["convert", "SRC", "OUT", "--quiet", "-n", "3"]
    assert build_argv(base, [("@1", "X"), ("-n", "9"), ("--json", None), ("--stop", "s")]) == \
        ["convert", "SRC", "X", "--quiet", "-n", "9", "--json", "--stop", "s"]
