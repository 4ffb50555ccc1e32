"""`gemma3 train` and `gemma3 merge-lora`: flags → `gemma3.train.TrainConfig` → `gemma3.train.train`."""

from __future__ import annotations

import argparse
import json
import os

from gemma3.errors import Gemma3Error

# flag → Gemma3Config field, for from-scratch architectures (HF names, as in config.json)
ARCH_FLAGS = {
    "hidden_size": int, "intermediate_size": int, "num_hidden_layers": int, "num_attention_heads": int,
    "num_key_value_heads": int, "head_dim": int, "sliding_window": int, "max_position_embeddings": int,
    "vocab_size": int, "query_pre_attn_scalar": float, "rope_theta": float, "rope_local_base_freq": float,
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="pretrain, fine-tune, LoRA or chat-SFT a model",
        description="Train a Gemma 3 model on text or chat data. From scratch with --init PRESET|CONFIG (plus "
                    "architecture flags), or continue from real weights with -m SOURCE (default: the embedded "
                    "270M); add --lora for adapters. JSONL records with 'messages' are chat SFT (loss only on "
                    "model turns, <end_of_turn> included). Multi-process: torchrun --nproc_per_node=N -m gemma3 "
                    "train ... [--distributed fsdp].",
        epilog="example: gemma3 train data/ --init 270m --hidden-size 128 --num-hidden-layers 4 --steps 500 "
               "-o runs/tiny")
    p.add_argument("data", nargs="*", help="text files, JSONL files, directories, or hf:NAME[@SPLIT] datasets "
                                           "(with --resume: default the run's own)")
    p.add_argument("-o", "--out-dir", help="run directory: checkpoints, metrics, loss.png (default: runs/gemma3); "
                                           "must be new or empty unless --resume or --overwrite")
    m = p.add_argument_group("model")
    m.add_argument("-m", "--model", metavar="SOURCE", default=None,
                   help="start from these weights: .gguf, checkpoint directory or Hub id (default: embedded 270M)")
    m.add_argument("--init", metavar="PRESET|FILE", help="train from scratch: a preset (270m, 1b, 4b, 12b, 27b) "
                                                         "or a JSON/YAML config file")
    for name, kind in ARCH_FLAGS.items():
        m.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, metavar="N",
                       help=argparse.SUPPRESS if name in ("rope_theta", "rope_local_base_freq",
                                                          "query_pre_attn_scalar", "vocab_size") else None)
    m.add_argument("--layer-pattern", metavar="P", help="layer types with --init: an integer period (6 = five "
                                                        "sliding layers then one global) or letters like SSG")
    m.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json, .gguf or directory (default: the model's)")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    lo.add_argument("--lora-r", type=int, default=8, help="rank (default: 8)")
    lo.add_argument("--lora-alpha", type=float, default=16.0, help="scaling numerator, update × alpha/r (default: 16)")
    lo.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input (default: 0)")
    lo.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                    help="comma-separated module names or all-linear (default: q_proj,k_proj,v_proj,o_proj)")
    d = p.add_argument_group("data")
    d.add_argument("--seq-len", type=int, default=512, help="tokens per packed sequence (default: 512)")
    d.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of documents (default: 0.05)")
    d.add_argument("--text-field", default="text", help="JSONL / dataset field holding the text (default: text)")
    d.add_argument("--data-cache", help="where token files go (default: OUT/data)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    o.add_argument("--epochs", type=float, metavar="N",
                   help="instead of --steps: N passes over the training sequences (steps = ceil(N x sequences / "
                        "global batch), said at the start)")
    o.add_argument("-b", "--batch-size", type=int, default=8, help="sequences per micro-batch per process (default: 8)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: 1)")
    o.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default: 3e-4)")
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak (default: 0.1)")
    o.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps (default: 100)")
    o.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default: 0.1)")
    o.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (default: 1.0)")
    o.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 = autocast with fp32 master weights; auto = bf16 on CUDA (default: auto)")
    o.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in backward")
    o.add_argument("--seed", type=int, default=0, help="seed for init, data order and samples (default: 0)")
    o.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    o.add_argument("--distributed", choices=("ddp", "fsdp"), default=None,
                   help="under torchrun: ddp (default) or fsdp (FSDP2, one unit per block)")
    e = p.add_argument_group("evaluation, checkpoints, logging")
    e.add_argument("--eval-every", type=int, default=100, help="steps between held-out evals, 0 = off (default: 100)")
    e.add_argument("--eval-batches", type=int, default=8, help="eval size in global batches (default: 8)")
    e.add_argument("--sample-every", type=int, default=None, help="steps between samples (default: --eval-every)")
    e.add_argument("--sample-prompt", action="append", default=[], metavar="TEXT",
                   help="prompt for sample generations (repeatable; chat data wraps it as a user turn)")
    e.add_argument("--sample-tokens", type=int, default=48, help="tokens per sample (default: 48)")
    e.add_argument("--sample-temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    e.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (default: 500)")
    e.add_argument("--keep", type=int, default=3, help="checkpoints to keep, 0 = all (default: 3)")
    e.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue from the newest checkpoint in --out-dir (or PATH) exactly where it stopped; the "
                        "model, data and flags come from the checkpoint, and flags given now may change only "
                        "what does not change the run (steps, learning rate, intervals ...)")
    e.add_argument("--overwrite", action="store_true", default=None,
                   help="start a new run in an --out-dir that holds an old one: its checkpoints, metrics, "
                        "samples, loss curve and TensorBoard events are removed (other files are kept)")
    e.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    e.add_argument("--quiet", action="store_true", help="no progress bar or status lines")
    e.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    for action in p._actions:  # only the flags given count (see config_from_args); help shows the real defaults
        if action.dest not in ("help", "data"):
            action.default = None
    p.set_defaults(func=run_train)

    g = sub.add_parser(
        "merge-lora", help="fold a LoRA adapter into its base model",
        description="Write BASE + ADAPTER as a standalone checkpoint directory (config.json, model.safetensors, "
                    "tokenizer.json): W' = W + (alpha/r)·B·A for every adapted layer. ADAPTER is a PEFT adapter "
                    "directory (ours or PEFT's).")
    g.add_argument("adapter", help="directory with adapter_config.json and adapter_model.safetensors")
    g.add_argument("-m", "--model", metavar="SOURCE", default=None,
                   help="the base model the adapter was trained on (default: the embedded 270M)")
    g.add_argument("-o", "--out", required=True, help="output directory (new or empty, unless --overwrite)")
    g.add_argument("--overwrite", action="store_true",
                   help="write into an existing directory, replacing the files this command writes (others are kept)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="saved dtype (default: float32)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=run_merge)


# TrainConfig fields set by flags of the same name
FLAG_FIELDS = ("out_dir", "model", "init", "tokenizer", "seq_len", "val_fraction", "text_field", "data_cache",
               "steps", "epochs", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
               "grad_clip", "precision", "gradient_checkpointing", "seed", "device", "distributed", "eval_every",
               "eval_batches", "sample_every", "sample_tokens", "sample_temperature", "save_every", "keep",
               "resume", "overwrite", "tensorboard")


def config_from_args(args: argparse.Namespace):
    """TrainConfig from the flags the user gave (every option defaults to None, so a given flag is one that is
    not None); with --resume, over the config stored in the checkpoint."""
    from gemma3.train import LoraSettings, TrainConfig
    from gemma3.train.rundir import resumed_config

    given = {name: getattr(args, name) for name in FLAG_FIELDS if getattr(args, name) is not None}
    if "steps" in given and "epochs" in given:
        raise Gemma3Error("give --steps or --epochs, not both (--epochs sets the number of steps)")
    if args.data:
        given["data"] = args.data
    overrides = {name: getattr(args, name) for name in ARCH_FLAGS if getattr(args, name) is not None}
    if args.layer_pattern is not None:
        overrides["layer_pattern"] = args.layer_pattern
    if overrides:
        given["model_overrides"] = overrides
    if args.sample_prompt:
        given["sample_prompts"] = args.sample_prompt
    if args.quiet:
        given["progress"] = False
    lora_flags = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                  "targets": args.lora_targets}
    if args.lora or any(v is not None for v in lora_flags.values()):
        if not args.lora:
            raise Gemma3Error("--lora-r, --lora-alpha, --lora-dropout and --lora-targets need --lora")
        defaults = LoraSettings()
        given["lora"] = LoraSettings(
            r=defaults.r if args.lora_r is None else args.lora_r,
            alpha=defaults.alpha if args.lora_alpha is None else args.lora_alpha,
            dropout=defaults.dropout if args.lora_dropout is None else args.lora_dropout,
            targets=defaults.targets if args.lora_targets is None else LoraSettings.parse_targets(args.lora_targets))
    if args.resume:
        return resumed_config(given.get("out_dir"), args.resume, given)
    if not args.data:
        raise Gemma3Error("no training data: pass text/JSONL files, directories or hf:NAME datasets "
                          "(only --resume takes them from the checkpoint)")
    return TrainConfig(**given)


def run_train(args: argparse.Namespace) -> int:
    from gemma3.train import train

    if args.init is None and not args.resume and any(getattr(args, n) is not None for n in ARCH_FLAGS):
        raise Gemma3Error("architecture flags (--hidden-size, --num-hidden-layers ...) need --init")
    result = train(config_from_args(args))
    if args.json and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(json.dumps({"step": result.step, "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                          "final_loss": result.losses[-1] if result.losses else None,
                          "eval_losses": result.eval_losses, "unigram_loss": result.unigram_loss}))
    return 0


def run_merge(args: argparse.Namespace) -> int:
    import sys

    import torch

    from gemma3.convert import merge_lora

    out = merge_lora(args.model, args.adapter, args.out, dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32,
                     progress=not args.quiet, overwrite=args.overwrite)
    print(f"merged model written to {out}", file=sys.stderr)
    return 0
