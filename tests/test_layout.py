"""The layout holds: imports run one way (docs/architecture.md), and no files import each other in a circle.

Read from the source with `ast` (nothing is imported), every import counted, the ones inside functions too:
a lazy import is still a dependency, and a circle of lazy imports is still a circle.

    cli                                   floor 7   the commands, thin
    serve, train, eval                    floor 6   what the commands run
    generation, loading, convert          floor 5   a model at work; a model from a source; a model to a file
    text, accel                           floor 4   tokenizer and chat; inference-only fast paths
    weights                               floor 3   checkpoint files
    model, kv_cache, kernels              floor 2   the architecture, its cache, the native code
    config                                floor 1
    errors, files, memory                 floor 0

An import may go down or sideways, never up; and a few rooms are kept apart on top of that (RULES).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "gemma3"

FLOORS = {
    "errors": 0, "files": 0, "memory": 0,
    "config": 1,
    "model": 2, "kv_cache": 2, "kernels": 2,
    "weights": 3,
    "text": 4, "accel": 4,
    "generation": 5, "loading": 5, "convert": 5,
    "serve": 6, "train": 6, "eval": 6,
    "cli": 7, "__main__": 7, "__init__": 7,
}

# (importer prefix, imported prefix, why not): on top of the floors
RULES = [
    ("gemma3.weights", "gemma3.text", "checkpoint files know nothing of the tokenizer's or chat's code"),
    ("gemma3.weights", "gemma3.accel", "checkpoint files know nothing of how a model is run fast"),
    ("gemma3.text", "gemma3.accel", "the tokenizer side and the fast paths are independent"),
    ("gemma3.accel", "gemma3.text", "the tokenizer side and the fast paths are independent"),
    ("gemma3.serve", "gemma3.train", "only the trainer and the CLI use training"),
    ("gemma3.eval", "gemma3.train", "only the trainer and the CLI use training"),
    ("gemma3.kv_cache", "gemma3.accel", "the cache is the model's; fast paths are swapped in from outside"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(name: str) -> bool:
    return (SRC / Path(*name.split(".")) / "__init__.py").is_file()


def exists(name: str) -> bool:
    target = SRC / Path(*name.split("."))
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The gemma3 modules that `path` imports anywhere in it."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "gemma3")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "gemma3":
                continue
            for alias in node.names:  # `from gemma3.accel import quantize` imports a module
                sub = f"{base}.{alias.name}"
                found.add(sub if exists(sub) else base)
    return {name for name in found if name != here}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def room(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_room_has_a_floor():
    """A new top-level module or package must be placed on a floor here (and in docs/architecture.md)."""
    assert {room(name) for name in graph()} <= set(FLOORS), sorted({room(n) for n in graph()} - set(FLOORS))


def test_imports_never_run_up_a_floor():
    up = [f"{a} (floor {FLOORS[room(a)]}) imports {b} (floor {FLOORS[room(b)]})"
          for a, targets in graph().items() for b in sorted(targets) if FLOORS[room(b)] > FLOORS[room(a)]]
    assert not up, "\n".join(up)


@pytest.mark.parametrize("importer, imported, why", RULES, ids=[f"{a}-{b}" for a, b, _ in RULES])
def test_rooms_kept_apart(importer, imported, why):
    bad = [f"{a} imports {b}" for a, targets in graph().items() if a.startswith(importer)
           for b in sorted(targets) if b.startswith(imported)]
    assert not bad, f"{why}:\n" + "\n".join(bad)


def test_model_imports_only_the_config():
    """model.py is the architecture: it imports the config (and the errors it raises), nothing else of ours."""
    assert graph()["gemma3.model"] <= {"gemma3.config", "gemma3.errors"}


def test_no_import_circles():
    """No set of files imports each other in a loop (Tarjan's strongly connected components)."""
    edges = graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not circles, "\n".join(" <-> ".join(c) for c in circles)


def test_the_checker_sees_what_it_checks(tmp_path):
    """The reader finds a lazy import inside a function and a `from package import module`, and the circle
    search finds a loop: a layout test that could not fail would hold nothing."""
    edges = graph()
    assert "gemma3.accel.fused_step" in edges["gemma3.accel"]  # imported inside Acceleration.fused_step
    assert "gemma3.kernels" in edges["gemma3.accel.native"]  # `from gemma3 import kernels`
    assert sum(len(t) for t in edges.values()) > 100
