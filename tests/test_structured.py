"""Structured output (gemma3.generation.structured over llguidance): schemas are checked when compiled, and generation
under a grammar gives JSON that parses and validates, through the Python API and `gemma3 generate
--json-schema` on the real 270M."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from gemma3.cli import main  # noqa: E402
from gemma3.errors import Gemma3Error  # noqa: E402
from gemma3.generation.generator import GenerationConfig, Generator  # noqa: E402
from gemma3.generation.sampling import SamplingParams  # noqa: E402
from gemma3.generation.structured import MAX_SCHEMA_BYTES, JsonGrammar  # noqa: E402

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                         "population": {"type": "integer", "minimum": 0, "maximum": 10**8},
                                         "kind": {"enum": ["capital", "town"]}},
        "required": ["city", "population", "kind"], "additionalProperties": False}


@pytest.mark.parametrize("schema,message", [
    ("{not json", "not valid JSON"), ("[1, 2]", "must be an object"), ({"type": "nonsense"}, "does not compile"),
    ({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}, "required": ["a"]}, "does not compile"),
    ("{" + '"a": 1, ' * MAX_SCHEMA_BYTES + '"b": 2}', "KiB"),
])
def test_bad_schemas_are_refused_when_compiled(schema, message):
    with pytest.raises(Gemma3Error, match=message):
        JsonGrammar.from_schema(schema)


@pytest.fixture(scope="module")
def gen(real_270m):
    return Generator(*real_270m)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generation_under_a_schema_validates(gen, temperature):
    config = GenerationConfig(max_new_tokens=80, sampling=SamplingParams(temperature=temperature), seed=3,
                              grammar=JsonGrammar.from_schema(CITY))
    results = gen.generate_batch(["The capital of France as JSON:", "A small town in Wales, as JSON:"], config)
    for r in results:
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), CITY)


def test_first_token_mask_allows_only_json_starts(gen):
    matcher = JsonGrammar.any_object().matcher(gen.tokenizer)
    allowed = matcher.allowed(gen.model.config.vocab_size)
    pieces = {gen.tokenizer.decode([int(i)]) for i in allowed.nonzero().squeeze(1)[:2000]}
    assert pieces and all(p.lstrip().startswith("{") for p in pieces), sorted(pieces)[:20]
    logits = matcher.constrain(torch.zeros(gen.model.config.vocab_size))
    assert torch.isinf(logits).sum() == gen.model.config.vocab_size - int(allowed.sum())


def test_cli_json_schema(capsys, tmp_path):
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps(CITY))
    code = main(["generate", "The capital of Italy as JSON:", "--json-schema", str(schema), "--temperature", "0",
                 "-n", "80", "--quiet", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["text"]), CITY)
    (tmp_path / "bad.json").write_text('{"type": 7}')
    assert main(["generate", "x", "--json-schema", str(tmp_path / "bad.json"), "--quiet"]) == 2
    assert "bad.json" in capsys.readouterr().err
