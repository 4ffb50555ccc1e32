"""`gemma3 lm-eval ARGS`: EleutherAI's lm-evaluation-harness command line with the `gemma3` model registered.

lm-eval has no plugin entry point, so its own `lm_eval` command cannot see models outside its package; this
runs that command (every flag of `lm_eval run`, `ls`, `validate`) after importing gemma3.eval.harness."""

from __future__ import annotations

import argparse
import sys

from gemma3.errors import Gemma3Error


def register(sub: argparse._SubParsersAction) -> None:
    # prefix_chars that no flag uses: every argument after `lm-eval` goes to lm-eval untouched, --help included.
    p = sub.add_parser(
        "lm-eval", add_help=False, prefix_chars="\0",
        help="evaluate with EleutherAI's lm-evaluation-harness (--model gemma3; needs gemma3[eval])",
        description="lm-eval's command line with the gemma3 model registered, e.g. gemma3 lm-eval --model gemma3 "
                    "--model_args pretrained=SOURCE,dtype=float32 --tasks hellaswag. `gemma3 lm-eval --help` is "
                    "lm-eval's help.")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run_lm_eval)


def run_lm_eval(args: argparse.Namespace) -> int:
    try:
        import lm_eval  # noqa: F401
    except ModuleNotFoundError:
        raise Gemma3Error("lm-eval is not installed: pip install 'gemma3[eval]'") from None
    from gemma3.eval.harness import main

    try:
        return main(args.lm_eval_args)
    except SystemExit as e:  # argparse inside lm-eval: its message is printed already
        return e.code if isinstance(e.code, int) else 2
    except (ValueError, KeyError, FileNotFoundError) as e:  # lm-eval's own errors for bad tasks, args, files
        if isinstance(e, Gemma3Error):
            raise
        text = str(e).strip().splitlines()
        print(f"gemma3 lm-eval: error: {type(e).__name__}: {text[0] if text else e!r}", file=sys.stderr)
        return 2
