"""The README's quick start and its cheap commands run as shown, and print what it shows.

The commands and the expected output are read from README.md itself, so the page cannot drift from the code:
the quick start's greedy text on the embedded model (the default path: the file's own Q4_K_M blocks on the
native kernels), the Python example, and the tour's commands that take seconds (the others — serving, training,
converting to a 1 GB directory, lm-eval — have tests of their own)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")
CHEAP = ("gemma3 generate", "gemma3 info", "echo ")  # the tour's commands that finish in seconds


def blocks(language: str = "") -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", TEXT, flags=re.M | re.S)


def quick_start_output() -> tuple[str, str]:
    """(the greedy text the README prints for the first command, that command)."""
    command = next(line for line in blocks("bash")[0].splitlines() if "gemma3 generate" in line)
    command = command[command.index("gemma3 generate"):]
    shown = TEXT[TEXT.index("What the first command prints"):]
    text = re.search(r"^```\n(.*?)^```", shown, flags=re.M | re.S).group(1)
    return text.splitlines()[1], command


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    assert argv[0] == "gemma3", command
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "gemma3", *argv[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_quick_start_prints_the_text_the_readme_shows(tmp_path):
    """The default path's greedy output is pinned: the embedded model in its own blocks, on the native kernels
    where they build, else on torch (the same arithmetic)."""
    text, command = quick_start_output()
    out = run(command, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == text
    assert re.search(r"\[6 prompt tokens, 40 generated, finish: length;", out.stderr)


def test_the_python_example_runs_and_prints_the_same_text(tmp_path):
    """The README's Python example: `gemma3.load()` (float weights, the file's blocks dequantised) greedy."""
    code = blocks("python")[0]
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    text, _ = quick_start_output()
    # float weights and the file's own blocks may part where two tokens are close; they start the same
    assert out.stdout.split()[:12] == text.split()[:12], (out.stdout, text)


def tour() -> list[tuple[str, str | None]]:
    """(command, the output line the README shows under it, if any) for the tour's cheap commands."""
    start = TEXT.index("## What it does")
    cases = []
    for block in re.findall(r"^```\n(.*?)^```", TEXT[start:], flags=re.M | re.S):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("$ ") and line[2:].startswith(CHEAP):
                shown = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("$ ") else None
                cases.append((line[2:], shown))
    return cases


@pytest.mark.parametrize("command, shown", tour(), ids=[c for c, _ in tour()])
def test_the_tours_cheap_commands_run_as_shown(tmp_path, command, shown):
    if command.startswith("echo "):  # writes the file the next command reads
        payload = re.match(r"echo '(.*)' > (\S+)$", command)
        (tmp_path / payload[2]).write_text(payload[1] + "\n")
        json.loads(payload[1])
        return
    for previous, _ in tour():  # a command may read what an earlier one of its block wrote
        if previous.startswith("echo ") and previous != command:
            payload = re.match(r"echo '(.*)' > (\S+)$", previous)
            (tmp_path / payload[2]).write_text(payload[1] + "\n")
    out = run(command, tmp_path)
    assert out.returncode == 0, (command, out.stderr)
    assert out.stdout.strip(), command
    if shown is not None:
        assert out.stdout.strip() == shown, (command, out.stdout)
    if "--json" in shlex.split(command):  # one JSON object with the result
        assert json.loads(out.stdout)["finish_reason"] in ("stop", "length")


def test_the_tour_is_found():
    """Guard: the extraction finds the commands it should (an empty parametrization would test nothing)."""
    commands = [c for c, _ in tour()]
    assert any(c.startswith("gemma3 info") for c in commands)
    assert sum(c.startswith("gemma3 generate") for c in commands) >= 3
    assert "Paris" in dict(tour())[next(c for c in commands if "--json-schema" in c)]
