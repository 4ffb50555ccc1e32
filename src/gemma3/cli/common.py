"""Options and loading shared by the commands that run a model."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gemma3.errors import Gemma3Error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("-m", "--model", metavar="SOURCE", default=None,
                       help="a .gguf file, a checkpoint directory (config.json + safetensors) or a Hub id such as "
                            "google/gemma-3-270m (default: the embedded Gemma 3 270M, no download)")
    group.add_argument("--dtype", choices=list(DTYPES), default="float32",
                       help="compute dtype (default: float32). Never float16: Gemma 3's residual stream "
                            "exceeds its range")
    group.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                       help="CPU threads for torch (default: torch's choice)")
    group.add_argument("--quiet", action="store_true", help="no progress bars or status lines on stderr")


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    chat_template: str | None
    load_s: float
    description: str


def load_from_args(args: argparse.Namespace) -> Loaded:
    from gemma3.loading import build_model, load_tokenizer, load_weights

    if args.threads is not None:
        if args.threads < 1:
            raise Gemma3Error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    config, state, resolved, metadata = load_weights(args.model, DTYPES[args.dtype], progress=not args.quiet)
    model = build_model(config, state)
    tokenizer = load_tokenizer(resolved, metadata)
    if tokenizer is None:
        raise Gemma3Error(f"{resolved.path}: no tokenizer.json or tokenizer.model next to the weights")
    template = chat_template_of(resolved.path if resolved.kind == "hf" else None, metadata)
    return Loaded(model, tokenizer, template, time.perf_counter() - start, resolved.description)


def chat_template_of(directory: Path | None, gguf_metadata: dict | None) -> str | None:
    """The checkpoint's own chat template, if it ships one (GGUF metadata, chat_template.jinja, or
    tokenizer_config.json); None means the built-in Gemma 3 format is used."""
    if gguf_metadata is not None:
        template = gguf_metadata.get("tokenizer.chat_template")
        return template if isinstance(template, str) and template else None
    if directory is None:
        return None
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, json.JSONDecodeError, AttributeError):
            raise Gemma3Error(f"{config}: not a valid JSON object") from None
        return template if isinstance(template, str) and template else None
    return None


def read_text_arg(text: str | None, file: str | None, what: str) -> str:
    """The text given on the command line, in a file (-f), or piped on stdin."""
    if text is not None and file is not None:
        raise Gemma3Error(f"give the {what} either as an argument or with -f, not both")
    if file is not None:
        try:
            return Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise Gemma3Error(f"{file}: cannot read {what}: {e}") from None
    if text is not None:
        return text
    if sys.stdin is None or sys.stdin.isatty():
        raise Gemma3Error(f"no {what}: pass it as an argument, with -f FILE, or on stdin")
    return sys.stdin.read()


def status(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)
