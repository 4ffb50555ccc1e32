"""Time-to-ready for model + tokenizer: the embedded GGUF, and a `gemma3 convert`ed safetensors directory.

    python benchmarks/bench_load.py [--threads 2] [--repeats 3] [--transformers]

Each figure is the best of `--repeats` runs in this process (imports excluded, page cache warm), except the
last: a whole `gemma3 generate PROMPT -n 1` process, from exec to exit (Python, torch and our imports
included; the kernel and tokenizer caches warm). `--transformers` also times transformers loading the same
GGUF (model, then tokenizer) for comparison.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transformers", action="store_true", help="also time transformers on the same GGUF")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import gemma3.model  # noqa: F401  (imports are not what we measure)
    import gemma3.text.tokenizer  # noqa: F401
    from gemma3.convert import convert
    from gemma3.loading import load
    from gemma3.weights.sources import embedded_gguf_path

    from gemma3.generation.generator import GenerationConfig, Generator
    from gemma3.generation.sampling import SamplingParams

    gguf = embedded_gguf_path()
    print(f"embedded GGUF -> model + tokenizer:        {best_of(args.repeats, lambda: load(progress=False)):6.2f} s")

    def first_token():  # what the CLI does by default: the file's own blocks, then one greedy token
        model, tokenizer, _ = load(progress=False, quantize=None)
        Generator(model, tokenizer).generate("The capital of France is", GenerationConfig(
            max_new_tokens=1, sampling=SamplingParams(temperature=0.0)))

    print(f"embedded GGUF -> first token (own blocks): {best_of(args.repeats, first_token):6.2f} s")
    command = [sys.executable, "-m", "gemma3", "generate", "The capital of France is", "-n", "1", "--temperature", "0",
               "-t", str(args.threads)]
    process = best_of(args.repeats, lambda: subprocess.run(command, check=True, capture_output=True))
    print(f"`gemma3 generate ... -n 1`, whole process:   {process:6.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("bfloat16", "float32"):
            out = convert(None, Path(tmp) / dtype, dtype=dtype, progress=False)
            seconds = best_of(args.repeats, lambda: load(out, dtype=getattr(torch, dtype), progress=False))
            print(f"safetensors dir ({dtype:>8}) -> model + tokenizer: {seconds:6.2f} s")
    if args.transformers:
        import transformers

        start = time.perf_counter()
        transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        middle = time.perf_counter()
        transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        end = time.perf_counter()
        print(f"transformers, same GGUF: model {middle - start:.2f} s + tokenizer {end - middle:.2f} s")


if __name__ == "__main__":
    main()
