"""What a JSON-schema constraint costs with Gemma 3's 262 144-token vocabulary, per grammar engine:

    python benchmarks/bench_grammar.py [--repeats 5]

For llguidance (what gemma3.generation.structured uses), xgrammar and outlines-core, where installed: the one-time
tokenizer setup, the compile time of a schema (a server pays it per request, before the request is queued),
and the time to compute the next-token mask at each step of a fixed valid JSON text (median and max over its
tokens, best of `--repeats`). A decode step of the embedded 270M on 2 cores takes ~30 ms; a mask costs a
request that fraction of its speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}
TEXT = ('{"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry", "engines"], '
        '"address": {"city": "London", "zip": "W1"}}')


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def report(name, setup, compile_s, masks):
    print(f"{name:14} setup {setup:6.2f} s   compile {compile_s * 1e3:8.2f} ms   mask per token: median "
          f"{statistics.median(masks) * 1e6:7.1f} µs, max {max(masks) * 1e6:8.1f} µs")


def bench_llguidance(tok, ids, repeats):
    import llguidance

    from gemma3.generation.structured import JSON_OPTIONS

    llt, setup = timed(lambda: llguidance.LLTokenizer(tok._backend.to_str(), n_vocab=len(tok),
                                                      eos_token=[tok.eos_id, tok.end_of_turn_id]))
    best_c, best_m = float("inf"), None
    for _ in range(repeats):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), overrides=JSON_OPTIONS)
        m, c = timed(lambda: llguidance.LLMatcher(llt, grammar, log_level=0))
        import numpy as np

        words = np.empty((llt.vocab_size + 31) // 32, dtype=np.int32)
        masks = []
        for i in ids:
            t = time.perf_counter()
            m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            masks.append(time.perf_counter() - t)
            assert m.consume_token(i), "llguidance rejected the text"
        best_c = min(best_c, c)
        best_m = masks if best_m is None or statistics.median(masks) < statistics.median(best_m) else best_m
    report("llguidance", setup, best_c, best_m)


def bench_xgrammar(tok, ids, repeats):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    def setup_():
        hf = PreTrainedTokenizerFast(tokenizer_object=tok._backend)
        return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(tok), stop_token_ids=[1, 106])

    info, setup = timed(setup_)
    best_c, best_m = float("inf"), None
    for _ in range(repeats):
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        compiled, c = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA)))
        matcher = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
        masks = []
        for i in ids:
            t = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            masks.append(time.perf_counter() - t)
            assert matcher.accept_token(i), "xgrammar rejected the text"
        best_c = min(best_c, c)
        best_m = masks if best_m is None or statistics.median(masks) < statistics.median(best_m) else best_m
    report("xgrammar", setup, best_c, best_m)


def bench_outlines(tok, ids, repeats):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    def setup_():
        vocab = {}  # token text -> ids (outlines-core takes text; byte-fallback and special tokens left out)
        for i in range(len(tok)):
            piece = tok.id_to_piece(i)
            if i in tok.special_ids or (piece.startswith("<0x") and piece.endswith(">")) or i == tok.eos_id:
                continue
            vocab.setdefault(piece.replace("\u2581", " "), []).append(i)
        return Vocabulary(tok.eos_id, vocab)

    vocabulary, setup = timed(setup_)
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    index, c = timed(lambda: Index(regex, vocabulary))  # one schema, one index: too slow to repeat
    guide = Guide(index)
    masks = []
    for i in ids:
        t = time.perf_counter()
        guide.get_tokens()
        masks.append(time.perf_counter() - t)
        guide.advance(i)
    report("outlines-core", setup, c, masks)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from gemma3.weights.sources import embedded_gguf_path
    from gemma3.text.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(embedded_gguf_path())
    ids = tok.encode(TEXT, add_bos=False)
    print(f"{len(tok)} tokens in the vocabulary; the JSON text is {len(ids)} tokens")
    for bench in (bench_llguidance, bench_xgrammar, bench_outlines):
        try:
            bench(tok, ids, args.repeats)
        except ModuleNotFoundError as e:
            print(f"{bench.__name__[6:]:14} not installed ({e.name})")
        except Exception as e:  # noqa: BLE001 - one engine failing should not hide the others
            print(f"{bench.__name__[6:]:14} failed: {type(e).__name__}: {str(e)[:200]}")


if __name__ == "__main__":
    main()
