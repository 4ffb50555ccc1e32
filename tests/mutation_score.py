"""Mutation score of the core modules: would their fast tests fail if the code were wrong?

mutmut (PyPI) rewrites one small thing at a time in a module (`<` for `<=`, `+ 1` for `- 1`, a string emptied,
an argument dropped) and runs the tests that reach that function. A mutant the tests do not fail on "survived":
either a test is missing or the change makes no difference anyone could observe (an equivalent mutant). Each
survivor here is either killed by a test or explained in tests/mutation_equivalents.py, and docs/mutation-testing.md
holds the last output.

    python tests/mutation_score.py                  # the six core modules (about 2 hours on two cores)
    python tests/mutation_score.py streaming files  # some of them
    python tests/mutation_score.py --markdown       # the table and the survivors as docs/mutation-testing.md shows them

It works in a new scratch copy of src/ and tests/ (a temporary directory, removed afterwards unless --keep; an
interrupted run kept that way goes on with --resume DIR), so the checkout is never written to, and installs mutmut (pinned) into this Python if it is missing.
Exit status 0 when every module scores at least --min-score and every survivor is explained; 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from mutation_equivalents import EQUIVALENT  # noqa: E402
MUTMUT = "mutmut==3.8.1"

# module -> (source file, the fast tests that cover it). mutmut runs, for each mutant, only the tests that
# reached the mutated function, so listing a test file here costs one clean run and one stats run.
MODULES = {
    "model": ("src/gemma3/model.py", ["tests/test_model.py", "tests/test_kv_cache.py"]),
    "sampling": ("src/gemma3/generation/sampling.py", ["tests/test_sampling.py"]),
    "streaming": ("src/gemma3/text/streaming.py", ["tests/test_streaming.py"]),
    "kv_cache": ("src/gemma3/kv_cache.py", ["tests/test_kv_cache.py"]),
    "chat": ("src/gemma3/text/chat.py", ["tests/test_chat.py", "tests/test_tools.py"]),
    "files": ("src/gemma3/files.py", ["tests/test_files.py"]),
}
# Slow or subprocess-driven tests: they take minutes a mutant, or import the unmutated package in a child.
DESELECT = ["tests/test_model.py::test_parity_270m_exact_config_600_tokens",
            "tests/test_tools.py::test_generator_chat_and_session_call_tools",
            "tests/test_tools.py::test_cli_chat_with_tools"]

KILLED = {"killed", "timeout", "caught by type check", "segfault"}


@dataclass
class Mutant:
    name: str
    status: str
    function: str = ""
    removed: str = ""
    added: str = ""
    diff: str = ""


@dataclass
class Result:
    module: str
    mutants: list[Mutant] = field(default_factory=list)

    @property
    def killed(self) -> int:
        return sum(m.status in KILLED for m in self.mutants)

    @property
    def score(self) -> float:
        return 100.0 * self.killed / max(len(self.mutants), 1)

    def survivors(self) -> list[Mutant]:
        return [m for m in self.mutants if m.status not in KILLED]


def ensure_mutmut() -> str:
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.exists():
        print(f"installing {MUTMUT} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", MUTMUT], check=True)
    return str(exe)


def scratch_copy(work: Path, modules: list[str]) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "mutants")
    shutil.copytree(ROOT / "src", work / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    sources = [MODULES[m][0] for m in modules]
    tests = sorted({t for m in modules for t in MODULES[m][1]})
    deselect = [a for d in DESELECT if d.split("::")[0] in tests for a in ("--deselect", d)]
    config = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    config += "\n[tool.mutmut]\n"
    config += 'source_paths = ["src/gemma3/"]\n'
    config += f"only_mutate = {sources!r}\n".replace("'", '"')
    config += f"pytest_add_cli_args_test_selection = {tests!r}\n".replace("'", '"')
    # -x: the first failing test kills the mutant; no cache: the copies stay clean
    config += f"pytest_add_cli_args = {['-x', '-q', '-p', 'no:cacheprovider', *deselect]!r}\n".replace("'", '"')
    # Fork each mutant's tests from a server that has only collected them: forked from mutmut's main process,
    # which ran the suite with torch's OpenMP threads (set_num_threads(2)), a child hangs in its first parallel op
    # (GNU libgomp is not fork-safe): spinning until the CPU limit (counted "timeout", i.e. killed) or blocked for good.
    config += 'process_isolation = "forkserver"\n'
    (work / "pyproject.toml").write_text(config, encoding="utf-8")


def parse_diff(diff: str) -> tuple[str, str]:
    removed = [line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return " / ".join(removed), " / ".join(added)


def function_of(name: str) -> str:
    """`gemma3.text.streaming.xǁTextStreamerǁpush__mutmut_3` -> `TextStreamer.push`."""
    short = re.sub(r"__mutmut_\d+$", "", name.rsplit(".", 1)[-1])
    return short[2:].replace("ǁ", ".") if short.startswith("x_") else short.strip("xǁ").replace("ǁ", ".")


def module_of(name: str) -> str:
    dotted = name.rsplit(".", 1)[0]
    for module, (source, _) in MODULES.items():
        if source.removeprefix("src/").removesuffix(".py").replace("/", ".") == dotted:
            return module
    return dotted


def collect(mutmut: str, work: Path, modules: list[str]) -> list[Result]:
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, capture_output=True, text=True, check=True)
    results = {m: Result(m) for m in modules}
    for line in out.stdout.splitlines():
        match = re.match(r"\s*(\S+): (.+)$", line)
        if not match:
            continue
        mutant = Mutant(match[1], match[2].strip())
        module = module_of(mutant.name)
        if module not in results:
            continue
        mutant.function = function_of(mutant.name)
        if mutant.status not in KILLED:
            mutant.diff = subprocess.run([mutmut, "show", mutant.name], cwd=work, capture_output=True,
                                         text=True, check=True).stdout
            mutant.removed, mutant.added = parse_diff(mutant.diff)
        results[module].mutants.append(mutant)
    return [results[m] for m in modules]


def explanation(module: str, mutant: Mutant) -> str | None:
    return EQUIVALENT.get((module, mutant.function, mutant.removed, mutant.added))


def report(results: list[Result], min_score: float, markdown: bool, show: bool) -> bool:
    ok = True
    if markdown:
        print("| module | mutants | killed | survived | score | survivors explained |")
        print("|---|--:|--:|--:|--:|--:|")
    else:
        print(f"{'module':<10} {'mutants':>7} {'killed':>6} {'survived':>8} {'score':>7}  explained")
    for r in results:
        survivors = r.survivors()
        explained = sum(explanation(r.module, m) is not None for m in survivors)
        ok &= r.score >= min_score and explained == len(survivors)
        row = (r.module, len(r.mutants), r.killed, len(survivors), f"{r.score:.1f} %", f"{explained}/{len(survivors)}")
        print("| " + " | ".join(map(str, row)) + " |" if markdown else
              f"{row[0]:<10} {row[1]:>7} {row[2]:>6} {row[3]:>8} {row[4]:>7}  {row[5]}")
    for r in results:
        for m in r.survivors():
            why = explanation(r.module, m)
            if markdown:
                print(f"\n- `{r.module}` `{m.function}` ({m.status}): `{m.removed}` → `{m.added}`  \n  "
                      f"{why or '**not explained**'}")
            else:
                print(f"\n{m.name} ({m.status}){'' if why else '  NOT EXPLAINED'}\n  - {m.removed}\n  + {m.added}"
                      + (f"\n  why: {why}" if why else ""))
                if show:
                    print(m.diff)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("modules", nargs="*", help=f"which modules (default: all of {', '.join(MODULES)})")
    parser.add_argument("--min-score", type=float, default=90.0, help="the bar per module, in %% (default 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    parser.add_argument("--markdown", action="store_true", help="print the results as docs/mutation-testing.md shows them")
    parser.add_argument("--show", action="store_true", help="print each survivor's whole diff")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (its path is printed)")
    parser.add_argument("--resume", metavar="DIR", type=Path,
                        help="go on with an interrupted run kept with --keep: mutants already tested keep their result")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module {unknown[0]!r}: choose from {', '.join(MODULES)}")
    modules = list(dict.fromkeys(args.modules)) or list(MODULES)
    if args.resume is not None and not (args.resume / "mutants").is_dir():
        parser.error(f"--resume {args.resume}: not a scratch directory of this script (no mutants/ in it)")
    mutmut = ensure_mutmut()
    work = args.resume or Path(tempfile.mkdtemp(prefix="gemma3-mutation-"))
    try:
        if args.resume is None:
            scratch_copy(work, modules)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        start = time.monotonic()
        print(f"mutmut in {work}: {', '.join(modules)} ...", file=sys.stderr)
        run = subprocess.run([mutmut, "run", "--max-children", str(args.jobs)], cwd=work, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if run.returncode != 0:
            tail = "\n".join(re.sub(r".*\r", "", run.stdout).splitlines()[-30:])
            print(f"error: mutmut run failed (exit {run.returncode}):\n{tail}", file=sys.stderr)
            return 1
        print(f"mutmut took {time.monotonic() - start:.0f} s with {args.jobs} jobs", file=sys.stderr)
        ok = report(collect(mutmut, work, modules), args.min_score, args.markdown, args.show)
    finally:
        if args.keep or args.resume is not None:
            print(f"scratch copy kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
