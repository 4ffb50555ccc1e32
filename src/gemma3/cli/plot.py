"""`gemma3 plot KIND`: pictures of the model at work (gemma3.eval.plot), written as PNG (or SVG/PDF by -o's suffix)."""

from __future__ import annotations

import argparse
import os

from gemma3.cli.common import add_model_args, read_text_arg, status
from gemma3.errors import Gemma3Error

LONG_TEXT_TOKENS = 768  # longer than the 512-token window, small enough to draw
LENS_PROMPT = "The capital of France is Paris. The capital of Italy is Rome. The capital of Germany is"


def register(sub: argparse._SubParsersAction) -> None:
    from gemma3.eval.plot import KINDS

    p = sub.add_parser(
        "plot", help="pictures of the model at work: masks, rope, attention, residual, logit-lens, kv-cache",
        description="Draw one picture. masks, rope and kv-cache need no weights (--preset); attention, residual "
                    "and logit-lens run the model (-m, default the embedded 270M) in fp32 on TEXT (default: "
                    f"the first {LONG_TEXT_TOKENS} tokens of CPython's pydoc topics, longer than the sliding "
                    "window; for logit-lens a short factual prompt).",
        epilog="example: gemma3 plot attention --layer 0 5 -o attention.png")
    p.add_argument("kind", choices=KINDS, help="what to draw")
    p.add_argument("text", nargs="?", default=None, help="the text to run (attention, residual, logit-lens)")
    p.add_argument("-f", "--file", default=None, help="read the text from FILE")
    p.add_argument("--layer", type=int, nargs="+", default=None, metavar="N",
                   help="attention: the layers to draw (default: the first sliding and the first global)")
    p.add_argument("--positions", type=int, default=8, metavar="N", help="logit-lens: the last N tokens (default 8)")
    p.add_argument("--preset", default="270m", help="masks, rope: the configuration (default 270m)")
    p.add_argument("-o", "--output", default=None, metavar="FILE", help="where to write (default: KIND.png)")
    p.add_argument("--overwrite", action="store_true", help="replace -o FILE if it exists")
    add_model_args(p)
    p.set_defaults(func=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    import gemma3.eval.plot as plots
    from gemma3.config import PRESETS, get_preset
    from gemma3.files import check_output_file, temp_path

    out = check_output_file(args.output or f"{args.kind}.png", overwrite=args.overwrite, flag="-o")
    suffix = out.suffix.lower()
    if suffix not in (".png", ".svg", ".pdf"):
        raise Gemma3Error(f"-o {out}: write .png, .svg or .pdf")
    if args.positions < 1:
        raise Gemma3Error(f"--positions must be >= 1, got {args.positions}")
    if args.kind in ("masks", "rope", "kv-cache"):
        config = get_preset(args.preset)
        fig = (plots.masks_figure(config) if args.kind == "masks" else plots.rope_figure(config)
               if args.kind == "rope" else plots.kv_cache_figure(tuple(PRESETS)))
    else:
        import torch

        from gemma3.cli.common import load_from_args, set_threads

        set_threads(args.threads)
        if args.quantize not in (None, "none"):
            raise Gemma3Error("plot runs the exact fp32 weights; --quantize does not apply")
        args.quantize, args.dtype = "none", "float32"
        loaded = load_from_args(args, torch.device("cpu"), torch.float32)
        status(args, f"loaded {loaded.description} in {loaded.load_s:.1f} s")
        tok = loaded.tokenizer
        if args.text is not None or args.file is not None:
            text = read_text_arg(args.text, args.file, "text")
            if not text.strip():
                raise Gemma3Error("the text is empty")
            ids = tok.encode(text, add_bos=not text.startswith("<bos>"))
        elif args.kind == "logit-lens":
            ids = tok.encode(LENS_PROMPT)
        else:
            from gemma3.eval.perplexity import pydoc_ids

            ids = pydoc_ids(tok, LONG_TEXT_TOKENS)
        if len(ids) > 4096:
            raise Gemma3Error(f"the text has {len(ids)} tokens; plot draws at most 4096")
        model = loaded.model
        if args.kind == "attention":
            fig = plots.attention_figure(model, tok, ids, args.layer)
        elif args.kind == "residual":
            fig = plots.residual_figure(model, ids)
        else:
            fig = plots.logit_lens_figure(model, tok, ids, args.positions)
    tmp = temp_path(out)
    try:
        fig.savefig(tmp, dpi=110, format=suffix[1:])
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    status(args, f"wrote {out}")
    return 0
