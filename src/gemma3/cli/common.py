"""Options and loading shared by the commands that run a model."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

from gemma3.errors import Gemma3Error
from gemma3.files import PROMPT_BYTES, check_text, read_stdin, read_text_file
from gemma3.loading import resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's range


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("-m", "--model", metavar="SOURCE", default=None,
                       help="a .gguf file, a checkpoint or training-run directory, a LoRA adapter directory, or a "
                            "Hub id such as google/gemma-3-270m (default: the embedded Gemma 3 270M, no download)")
    group.add_argument("--lora", metavar="ADAPTER", default=None,
                       help="a LoRA adapter directory (PEFT's files, or a LoRA run's checkpoint) folded into the "
                            "weights in memory; the files are not changed")
    group.add_argument("--dtype", choices=list(DTYPES), default=None,
                       help="compute dtype (default: float32 on CPU, bfloat16 on CUDA). Never float16: Gemma 3's "
                            "residual stream exceeds its range")
    group.add_argument("--quantize", choices=["none", "int8", "int4"], default=None,
                       help="weights for CPU inference: none = float (--dtype), int8 = 8-bit groups of 32 (Q8_0), "
                            "int4 = 4-bit groups of 32 with a min (Q4_1, fitted with an importance matrix measured "
                            "on a built-in calibration text; k, v, the embedding/head and half the layers' down at "
                            "Q8_0), quantized at load (int4 takes ~10 s). Default: a quantized GGUF (the embedded "
                            "model is Q4_K_M) runs in its own blocks, anything else in float")
    group.add_argument("--device", default="auto", metavar="DEVICE",
                       help="cpu, cuda, cuda:N, or auto = CUDA when available (default: auto)")
    group.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                       help="CPU threads for torch, at most the cores available (default: torch's choice)")
    group.add_argument("--quiet", action="store_true", help="no progress bars or status lines on stderr")


KV_CACHE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_cache_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default="auto",
                        help="what the KV cache stores keys and values in. auto (default): float16 for a quantized "
                             "model on the CPU (the fused decode step reads it natively: half the cache's memory, "
                             "perplexity within 0.01 %% of float32's, as llama.cpp keeps its cache), else the "
                             "compute dtype. Attention always computes in the compute dtype")


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    chat_template: object | None  # gemma3.text.chat.ChatTemplate, or None for the built-in Gemma 3 format
    load_s: float
    description: str


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> None:
    """--threads: at least 1, at most the cores this process may run on (more only slows a CPU run down)."""
    if threads is None:
        return
    if threads < 1:
        raise Gemma3Error(f"--threads must be >= 1, got {threads}")
    cores = available_cores()
    if threads > cores:
        print(f"warning: --threads {threads} is more than the {cores} cores available; using {cores}", file=sys.stderr)
        threads = cores
    torch.set_num_threads(threads)


def prepare_run(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Check and apply the flags that say where the model runs, before the (slow) load: the device, the
    dtype (CUDA computes in bf16 by default, the CPU in fp32) and the CPU threads."""
    from gemma3.loading import check_quantize

    device = resolve_device(args.device)
    check_quantize(args.quantize, device)
    set_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    return device, DTYPES[dtype]


def load_from_args(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Loaded:
    """The model the flags name, on `device` in `dtype` (from `prepare_run`)."""
    from gemma3.loading import build_model, chat_template_of, load_tokenizer, load_weights

    start = time.perf_counter()
    config, state, resolved, metadata = load_weights(args.model, dtype, progress=not args.quiet, lora=args.lora,
                                                     quantize=args.quantize, device=device)
    model = build_model(config, state, device)
    from gemma3.accel.quantize import is_quantized, kernel_note

    if is_quantized(model) and kernel_note() and not args.quiet:
        print(kernel_note(), file=sys.stderr)
    tokenizer = load_tokenizer(resolved, metadata)
    if tokenizer is None:
        raise Gemma3Error(f"{resolved.path}: no tokenizer.json or tokenizer.model next to the weights")
    template = chat_template_of(resolved, metadata)
    return Loaded(model, tokenizer, template, time.perf_counter() - start, resolved.description)


def check_seed(seed: int | None) -> int | None:
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise Gemma3Error(f"--seed must be in [0, 2**64 - 1], got {seed}")
    return seed


def read_text_arg(text: str | None, file: str | None, what: str, cap: int = PROMPT_BYTES) -> str:
    """The text given on the command line, in a file (-f), or piped on stdin: UTF-8, at most `cap` bytes."""
    if text is not None and file is not None:
        raise Gemma3Error(f"give the {what} either as an argument or with -f, not both")
    if file is not None:
        return read_text_file(file, cap, what)
    if text is not None:
        return check_text(text, f"the {what} argument")
    if sys.stdin is None or sys.stdin.isatty():
        raise Gemma3Error(f"no {what}: pass it as an argument, with -f FILE, or on stdin")
    return read_stdin(cap, what)


def status(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)
