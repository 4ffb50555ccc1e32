"""Structured output: constrain generation to JSON that matches a schema (or to any JSON object).

Each step, the grammar engine says which of the 262 144 tokens may come next; the others' logits become -inf
before sampling, so the text parses and validates by construction. When the JSON is complete, only the stop
tokens are allowed, and generation ends with finish_reason "stop".

The engine is llguidance (one of those llama.cpp and vLLM ship). Every engine's mask costs far less than a
decode step, so what decides is the compile, which a server pays for every request, before queueing it (a
schema that does not compile is a 400, not a failure mid-stream): llguidance's is the cheapest by far, and
outlines-core builds a whole automaton over the vocabulary per schema (the figures: docs/generation.md,
"Structured output"; benchmarks/bench_grammar.py). llguidance also reads our tokenizer.json directly, with no
transformers import. Its tokenizer setup is cached per tokenizer.

Whitespace is fixed (", " and ": ", no newlines or indentation): a base model given a free choice of
whitespace can spend its whole budget on it, and the JSON is then cut off before it closes.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import torch

from gemma3.errors import Gemma3Error

# The separators the grammar allows: one canonical layout (see the module docstring).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SCHEMA_BYTES = 64 << 10

_llg_tokenizers: dict[int, Any] = {}
_lock = threading.Lock()


def _llguidance():
    try:
        import llguidance
    except ModuleNotFoundError as e:
        raise Gemma3Error("structured output needs llguidance: pip install 'gemma3[serve]' "
                          "(or pip install llguidance)") from e
    return llguidance


def engine_tokenizer(tokenizer, stop_ids: tuple[int, ...] = ()):
    """llguidance's view of our tokenizer, built once per tokenizer object (seconds for Gemma's vocabulary)."""
    llg = _llguidance()
    key = id(tokenizer)
    with _lock:
        cached = _llg_tokenizers.get(key)
        if cached is None or cached[0] is not tokenizer:
            eos = list(dict.fromkeys([tokenizer.eos_id, tokenizer.end_of_turn_id, *stop_ids]))
            llt = llg.LLTokenizer(tokenizer.to_json(), n_vocab=len(tokenizer), eos_token=eos)
            cached = _llg_tokenizers[key] = (tokenizer, llt)
    return cached[1]


class Grammar:
    """A compiled llguidance grammar; `matcher()` gives a fresh per-generation state."""

    def __init__(self, grammar: str, description: str):
        self.grammar, self.description = grammar, description

    def matcher(self, tokenizer, stop_ids: tuple[int, ...] = ()) -> "JsonMatcher":
        return JsonMatcher(self, engine_tokenizer(tokenizer, stop_ids))


class JsonGrammar(Grammar):
    """A compiled constraint: `JsonGrammar.from_schema(schema)` or `JsonGrammar.any_object()`. Compiling
    checks the schema (a Gemma3Error names what is wrong)."""

    @classmethod
    def from_schema(cls, schema: Any) -> "JsonGrammar":
        if isinstance(schema, (str, bytes)):
            if len(schema) > MAX_SCHEMA_BYTES:
                raise Gemma3Error(f"the JSON schema is over {MAX_SCHEMA_BYTES >> 10} KiB")
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError) as e:
                raise Gemma3Error(f"the JSON schema is not valid JSON: {e}") from None
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise Gemma3Error(f"a JSON schema must be an object, got {type(schema).__name__}")
        text = json.dumps(schema)
        if len(text) > MAX_SCHEMA_BYTES:
            raise Gemma3Error(f"the JSON schema is over {MAX_SCHEMA_BYTES >> 10} KiB")
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(text, overrides=JSON_OPTIONS)
        except (ValueError, RuntimeError) as e:
            raise Gemma3Error(f"the JSON schema does not compile: {e}") from None
        error = llg.LLMatcher.validate_grammar(grammar)
        if error:
            raise Gemma3Error(f"the JSON schema does not compile: {error}")
        return cls(grammar, "json_schema")

    @classmethod
    def any_object(cls) -> "JsonGrammar":
        grammar = cls.from_schema({"type": "object"})
        grammar.description = "json_object"
        return grammar

class JsonMatcher:
    """Where one generation is in the grammar: `constrain(logits)` masks what may not come next, `advance`
    takes the sampled token."""

    def __init__(self, grammar: Grammar, llg_tokenizer):
        llg = _llguidance()
        self._m = llg.LLMatcher(llg_tokenizer, grammar.grammar, log_level=0)
        if self._m.is_error():
            raise Gemma3Error(f"the JSON schema does not compile: {self._m.get_error()}")
        self._words = np.empty((llg_tokenizer.vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self, vocab: int) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar allows next."""
        self._m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")[:vocab]
        if bits.shape[0] < vocab:
            bits = np.pad(bits, (0, vocab - bits.shape[0]))
        return torch.from_numpy(bits.astype(bool))

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (V,) or (1, V) float: a copy with every token the grammar forbids at -inf."""
        allowed = self.allowed(logits.shape[-1])
        return logits.masked_fill(~allowed.view_as(logits) if logits.dim() == 1 else ~allowed[None], -float("inf"))

    def advance(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            raise Gemma3Error(f"structured output: token {token} is not allowed by the grammar "
                              f"({self._m.get_error() or 'rejected'})")

    @property
    def finished(self) -> bool:
        """The JSON is complete: only a stop token may follow."""
        return self._m.is_stopped()
