"""One training loop for every job: pretraining from scratch, continued pretraining / full fine-tuning,
LoRA, and chat SFT. What differs between them is only where the weights come from (a fresh init or a model
source), which parameters train (all, or LoRA adapters) and what the data's target mask says (every token,
or only the model turns).

    data ─► TokenFile (tokenized once, memory-mapped) ─► PackedDataset (train / held-out)
    step s ─► global_batch_indices(s) ─► this rank's micro-batches ─► forward (chunked CE) ─► backward
          ─► clip ─► AdamW ─► lr(s+1) ─► log / eval / samples / checkpoint

The loss of a step is the mean over *all* target tokens of the step's global batch (every micro-batch on
every rank), not a mean of per-batch means: each micro-batch's mean is re-weighted by its share of the
step's targets. That is what makes gradient accumulation and N processes give the same curve as one
process with the whole batch, even when chat masks leave different numbers of targets in each sequence.

Determinism: the init, LoRA init, data order and sample draws are seeded from `seed`; the batch of step s
is a pure function of (seed, s). A checkpoint stores the step, the optimizer state and the RNG state, so
`--resume` reproduces the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma3.config import Gemma3Config, get_preset, hybrid_layer_types
from gemma3.errors import CheckpointError, ConfigError, Gemma3Error
from gemma3.train import checkpoint as ckpt
from gemma3.train import distributed as dist_
from gemma3.train.data import (IGNORE_INDEX, DataError, Example, PackedDataset, TokenFile, collate, global_batch_indices,
                               split_documents, unigram_loss)
from gemma3.train.config import SCHEDULE_FIELDS, TrainConfig, lr_at, schedule
from gemma3.train.lora import apply_lora, describe, hold_frozen_in
from gemma3.train.loss import use_fused_loss
from gemma3.train.optim import AdamW
from gemma3.train.attention import use_training_attention
from gemma3.weights.lora import write_adapter
from gemma3.train.metrics import LOSS_PNG, METRICS, Metrics, plot_loss, progress_bar
from gemma3.train.rundir import absolute, prepare_run_dir, stored_config

__all__ = ["TrainConfig", "TrainResult", "Trainer", "TrainingError", "lr_at", "train"]


class TrainingError(Gemma3Error):
    """The run cannot go on (a non-finite loss, a checkpoint that does not fit this run)."""


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    losses: list[float]  # train loss of each step this process ran
    eval_losses: dict[int, float]
    unigram_loss: float | None


# ---------------------------------------------------------------------------------------- model set-up
def scratch_config(init: str, overrides: dict[str, Any]) -> Gemma3Config:
    """A preset name or a JSON/YAML config file (ours or HF's), then flag overrides.

    `layer_pattern` (an int P: every P-th layer global, or a string like "SSSSSG" repeated over the depth)
    becomes `layer_types`; changing `head_dim` alone also moves `query_pre_attn_scalar` (it equals hd)."""
    path = Path(init).expanduser()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise ConfigError("YAML configs need PyYAML (pip install 'gemma3[train]')") from None
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields")
        if "model_type" in data or "text_config" in data:
            config = Gemma3Config.from_hf_dict(data, where=str(path))
        else:
            try:
                config = Gemma3Config.from_dict(data)
            except TypeError as e:
                raise ConfigError(f"{path}: {e}") from None
    elif path.suffix.lower() == ".json" or path.is_file():
        config = Gemma3Config.from_json_file(path)
    else:
        config = get_preset(init)
    overrides = dict(overrides)
    pattern = overrides.pop("layer_pattern", None)
    if "head_dim" in overrides and "query_pre_attn_scalar" not in overrides:
        overrides["query_pre_attn_scalar"] = overrides["head_dim"]
    try:
        config = config.replace(**overrides)
        if pattern is not None:
            config = config.replace(layer_types=layer_types_from_pattern(pattern, config.num_hidden_layers))
    except TypeError as e:
        raise ConfigError(str(e)) from None
    return config


def layer_types_from_pattern(pattern: int | str, num_layers: int) -> tuple[str, ...]:
    """6 → Gemma 3's 5 sliding : 1 global; "SSG" → sliding, sliding, global, repeated over the depth."""
    if isinstance(pattern, int) or str(pattern).isdigit():
        period = int(pattern)
        if period <= 0:
            raise ConfigError(f"layer pattern period must be positive, got {period}")
        return hybrid_layer_types(num_layers, period)
    letters = str(pattern).upper()
    if not letters or set(letters) - {"S", "G", "L"}:
        raise ConfigError(f"layer pattern must be an integer period or letters S (sliding) / G (global), got {pattern!r}")
    kinds = ["full_attention" if c == "G" else "sliding_attention" for c in letters]
    return tuple(kinds[i % len(kinds)] for i in range(num_layers))


def tokenizer_for_run(spec: str | None):
    from gemma3.text.tokenizer import Tokenizer

    if spec is None:
        from gemma3.weights.sources import embedded_gguf_path

        return Tokenizer.from_gguf(embedded_gguf_path())
    path = Path(spec).expanduser()
    if path.is_dir():
        return Tokenizer.from_dir(path)
    if path.suffix.lower() == ".gguf":
        return Tokenizer.from_gguf(path)
    return Tokenizer.from_file(path)


def check_fits(config: Gemma3Config, cfg: TrainConfig, loaded: bool = False) -> None:
    """Refuse a run that cannot fit in memory before allocating it (an allocation the machine cannot hold ends
    in a traceback or an out-of-memory kill). Lower bounds only, so nothing that fits is refused: fp32
    weights, gradients and AdamW's two moments are 16 bytes a parameter (4 of them already taken when the
    weights are `loaded`; LoRA trains next to none), and backward keeps at least the fp32 residual stream of
    every layer for every token of a micro-batch."""
    from gemma3.loading import resolve_device
    from gemma3.memory import available_memory

    free = available_memory(resolve_device(cfg.device))
    if free is None:
        return
    params = config.num_parameters()
    weights = params * ((0 if loaded else 4) + (0 if cfg.lora is not None else 12))
    activations = cfg.batch_size * cfg.seq_len * config.hidden_size * config.num_hidden_layers * 4
    if weights + activations > free:
        raise Gemma3Error(f"this run needs at least {(weights + activations) / 2**30:,.1f} GiB ({params:,} parameters; "
                          f"micro-batches of {cfg.batch_size} x {cfg.seq_len} tokens), more than the "
                          f"{free / 2**30:.1f} GiB free; make the model or --batch-size smaller")


def model_for_run(cfg: TrainConfig, main: bool):
    """(model in fp32 on CPU, tokenizer, config, description of where the weights came from)."""
    if cfg.init is not None:
        config = scratch_config(cfg.init, cfg.model_overrides)
        check_fits(config, cfg)
        tokenizer = tokenizer_for_run(cfg.tokenizer)
        from gemma3.model import Gemma3Model

        model = Gemma3Model(config)
        model.init_weights(torch.Generator().manual_seed(cfg.seed))
        origin = f"from scratch ({cfg.init})"
    else:
        from gemma3.loading import load

        model, tokenizer, config = load(cfg.model, dtype=torch.float32, progress=cfg.progress and main)
        check_fits(config, cfg, loaded=True)
        if cfg.tokenizer is not None:
            tokenizer = tokenizer_for_run(cfg.tokenizer)
        if tokenizer is None:
            raise CheckpointError(f"{cfg.model}: has no tokenizer files; pass --tokenizer")
        origin = cfg.model or "the embedded Gemma 3 270M"
    if cfg.seq_len > config.max_position_embeddings:
        raise DataError(f"--seq-len {cfg.seq_len} is longer than the model's context "
                        f"(max_position_embeddings {config.max_position_embeddings})")
    return model, tokenizer, config, origin


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively, so mixed precision is faster than fp32: a CUDA GPU with bf16,
    or a CPU with AVX-512 BF16 or AMX (elsewhere torch emulates bf16 and fp32 is faster)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes
        return False


# ----------------------------------------------------------------------------------------- the trainer
class Trainer:
    """Sets a run up from a `TrainConfig` and runs it (`run()`); `train(cfg)` is the one-call form."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.env = dist_.init(cfg.distributed, cfg.device)
        self.main = self.env.is_main
        self.out = Path(cfg.out_dir)
        torch.manual_seed(cfg.seed)
        self._check_run_dir()
        self.resume_from = ckpt.resolve_resume(cfg.resume, self.out) if cfg.resume else None
        resume_state = ckpt.read_train_state(self.resume_from) if self.resume_from else None
        self.lr_anchor: tuple[int, float] | None = None
        origin = self._build_model()
        self._build_data()
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.env.world_size
        if cfg.epochs is not None:
            cfg.steps = max(1, math.ceil(cfg.epochs * len(self.train_set) / self.global_batch))
        if resume_state is not None:
            self._check_resume(resume_state)
        self.module = dist_.wrap(self.model, self.env)  # what forward is called on (the model, DDP, or FSDP)
        self._build_optimizer()
        self.step = 0
        self.tokens_seen = 0
        if self.resume_from is not None:
            self._restore(resume_state)
        self._start_outputs(origin)

    # ----------------------------------------------------------------------------------------- setup
    def _check_run_dir(self) -> None:
        """Before anything is written: rank 0 checks the run directory, and every rank stops if it refused."""
        error = None
        if self.main:
            try:
                prepare_run_dir(self.cfg)
            except Gemma3Error as e:
                error = str(e)
        error = dist_.broadcast_object(error, self.env)
        if error is not None:
            raise Gemma3Error(error)

    def _build_model(self) -> str:
        """The model (LoRA-wrapped if asked, with the training loss head) on the device; returns where its
        weights came from."""
        cfg = self.cfg
        model, self.tokenizer, self.config, origin = model_for_run(cfg, self.main)
        self.lora_targets = None
        if cfg.lora is not None:
            self.lora_targets = apply_lora(model, cfg.lora, torch.Generator().manual_seed(cfg.seed + 1))
        use_fused_loss(model)  # the loss never holds a chunk's logits for backward (train/loss.py)
        use_training_attention(model)  # packed conversations attend one at a time (train/attention.py)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        self.model = model.to(self.env.device)
        self.precision = cfg.precision
        if self.precision == "auto":
            self.precision = "bf16" if native_bf16(self.env.device) else "fp32"
        if self.precision == "bf16" and cfg.lora is not None:
            hold_frozen_in(self.model, torch.bfloat16)  # only ever read by bf16 matmuls: half the bytes
        return origin

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        # FSDP2 swaps parameters for DTensors in place: build the optimizer over the wrapped ones
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]  # norm gains: decaying them pulls them towards 1 + 0
        # torch's AdamW, a slice at a time: its temporaries were the peak of a full fine-tuning step (train/optim.py)
        self.optimizer = AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)

    def _start_outputs(self, origin: str) -> None:
        """Rank 0: the run directory, the tokenizer file the checkpoints link, the metrics, and what the run is."""
        cfg = self.cfg
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.tokenizer_file = self.out / ckpt.TOKENIZER
        if self.main and not self.tokenizer_file.exists():
            self.tokenizer.save(self.tokenizer_file)
        self.metrics = Metrics(self.out, cfg.tensorboard, self.step if self.resume_from else None) if self.main else None
        if not self.main:
            return
        what = f"LoRA r={cfg.lora.r} on {', '.join(cfg.lora.targets)}: " if cfg.lora else ""
        self._say(f"model: {origin}, {self.config.num_hidden_layers} layers, d={self.config.hidden_size}; "
                  f"{what}{describe(self.model)}")
        self._say(f"data: {self.tokens.meta['num_tokens']:,} tokens in {self.tokens.num_docs:,} "
                  f"{self.tokens.kind} documents; {len(self.train_set):,} train / {len(self.val_set):,} held-out "
                  f"sequences of {cfg.seq_len}; global batch {self.global_batch} sequences"
                  + (f"; {cfg.epochs:g} epochs = {cfg.steps:,} steps" if cfg.epochs is not None else "")
                  + (f"; unigram baseline {self.unigram:.3f}" if self.unigram is not None else ""))
        if self.resume_from:
            self._say(f"resuming from {self.resume_from} at step {self.step}")
        self.metrics.log({"event": "resume" if self.resume_from else "start", "step": self.step,
                          "unigram_loss": self.unigram, "world_size": self.env.world_size,
                          "precision": self.precision})

    # ---------------------------------------------------------------------------------------- data
    def _build_data(self) -> None:
        cfg = self.cfg
        cache = Path(cfg.data_cache) if cfg.data_cache else self.out / "data"
        # rank 0 tokenizes; the others wait, then map the same file. An error is broadcast so all ranks stop.
        error = None
        if self.main:
            try:
                TokenFile.build(cfg.data, self.tokenizer, cache, cfg.text_field, progress=cfg.progress)
            except Gemma3Error as e:
                error = str(e)
        error = dist_.broadcast_object(error, self.env)
        if error is not None:
            raise DataError(error)
        self.tokens = TokenFile.build(cfg.data, self.tokenizer, cache, cfg.text_field, progress=False)
        if self.tokens.meta["max_id"] >= self.config.vocab_size:
            raise DataError(f"the data holds token id {self.tokens.meta['max_id']}, outside the model's vocabulary "
                            f"({self.config.vocab_size}): the tokenizer does not belong to this model")
        train_docs, val_docs = split_documents(self.tokens.num_docs, cfg.val_fraction, cfg.seed)
        pad = self.tokenizer.pad_id
        self.train_set = PackedDataset(self.tokens, train_docs, cfg.seq_len, pad, part="train",
                                       val_fraction=cfg.val_fraction)
        self.val_set = PackedDataset(self.tokens, val_docs, cfg.seq_len, pad, part="val",
                                     val_fraction=cfg.val_fraction)
        if len(self.train_set) == 0:
            raise DataError(f"the training split holds fewer than {cfg.seq_len} tokens: not one sequence of "
                            f"--seq-len {cfg.seq_len} (lower --seq-len or add data)")
        self.unigram = None
        if self.main and len(self.val_set):
            self.unigram = unigram_loss(self.tokens, self.val_set)

    # -------------------------------------------------------------------------------------- resume
    def _resume_identity(self) -> dict[str, Any]:
        """What must not change between a run and its resumption (anything else may: steps, intervals ...)."""
        cfg = self.cfg
        return {"model_config": self.config.to_dict(),
                "lora": dataclasses.asdict(cfg.lora) if cfg.lora else None,
                "seq_len": cfg.seq_len, "global_batch": self.global_batch, "seed": cfg.seed,
                "val_fraction": cfg.val_fraction, "data_fingerprint": self.tokens.meta["fingerprint"]}

    def _check_resume(self, state: dict) -> None:
        mine = json.loads(json.dumps(self._resume_identity()))  # tuples → lists, as stored
        for key, value in mine.items():
            theirs = state.get(key)
            if theirs == value:
                continue
            if key == "model_config" and isinstance(theirs, dict):
                diffs = [f"{k}={theirs.get(k)!r} there, {v!r} here" for k, v in value.items() if theirs.get(k) != v]
                detail = "; ".join(diffs[:3])
            elif key == "data_fingerprint":
                detail = "the training data or tokenizer changed"
            else:
                detail = f"{theirs!r} there, {value!r} here"
            raise CheckpointError(f"cannot resume from {self.resume_from}: mismatched {key} ({detail})")

    def _restore(self, state: dict) -> None:
        path = self.resume_from
        if self.cfg.lora is None:
            weights = ckpt.read_model_state(path)
        else:
            from gemma3.weights.lora import read_adapter

            _, adapter, _ = read_adapter(path)
            weights = {f"{k}.weight": v for k, v in adapter.items()}
        dist_.load_model_state(self.module, weights, self.env)
        trainer_state = ckpt.read_trainer_state(path)
        dist_.load_optimizer_state(self.module, self.optimizer, trainer_state["optimizer"], self.env)
        torch.set_rng_state(trainer_state["rng"]["torch"])
        if torch.cuda.is_available() and trainer_state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(trainer_state["rng"]["cuda"], self.env.device)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        anchor = state.get("lr_anchor")
        self.lr_anchor = (int(anchor[0]), float(anchor[1])) if anchor else None
        stored = state.get("train_config") or {}
        before = dataclasses.replace(self.cfg, **{k: stored[k] for k in SCHEDULE_FIELDS if k in stored})
        if schedule(before) != schedule(self.cfg) and self.step >= before.warmup_steps:
            # the schedule changed: continue from the rate the run had reached (see lr_at)
            rate = lr_at(self.step, before, self.lr_anchor) * (self.cfg.lr / before.lr if before.lr else 1.0)
            self.lr_anchor = (self.step, rate)

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg, self.lr_anchor)

    # ----------------------------------------------------------------------------------------- loop
    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss(self, batch: Example) -> torch.Tensor:
        """The mean loss of a batch over its targets (packed rows: each conversation attends only to itself)."""
        dev = self.env.device
        return self.module(batch.input_ids.to(dev), positions=batch.positions.to(dev),
                           labels=batch.labels.to(dev)).loss

    def _micro_batches(self, step: int) -> list[Example]:
        cfg, env = self.cfg, self.env
        idx = global_batch_indices(step, self.global_batch, len(self.train_set), cfg.seed)
        per_rank = cfg.batch_size * cfg.grad_accum
        mine = idx[env.rank * per_rank:(env.rank + 1) * per_rank]
        return [collate(self.train_set, mine[i:i + cfg.batch_size]) for i in range(0, per_rank, cfg.batch_size)]

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over the global batch. Returns (loss, grad norm) as Python floats."""
        cfg, env, dev = self.cfg, self.env, self.env.device
        lr = self.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self._micro_batches(self.step)
        counts = [int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches]
        total = dist_.all_reduce_sum(torch.tensor(float(sum(counts)), device=dev), env)
        loss_sum = torch.zeros((), device=dev)
        self.module.train()
        for i, (b, n) in enumerate(zip(batches, counts)):
            with dist_.gradient_sync(self.module, env, sync=i == len(batches) - 1), self._autocast():
                loss = self._loss(b)
                # this micro-batch's share of the step's mean; × world undoes DDP/FSDP's gradient averaging
                (loss * (n * env.world_size) / total.clamp(min=1)).backward()
            loss_sum += loss.detach().float() * n
        step_loss = float(dist_.all_reduce_sum(loss_sum, env) / total.clamp(min=1))
        if not math.isfinite(step_loss):
            self._stop_non_finite("loss", step_loss)
        norm = float(dist_.clip_grad_norm([p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip))
        if not math.isfinite(norm):
            self._stop_non_finite("gradient norm", norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.global_batch * cfg.seq_len
        return step_loss, norm

    def _last_good(self) -> str:
        last = ckpt.latest_checkpoint(self.out)
        return f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"

    def _stop_non_finite(self, what: str, value: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"{what} is {value} at step {self.step + 1}; stopped without updating or saving "
                            f"({self._last_good()}; resume from it with a lower --lr)")

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean held-out loss over the first eval_batches · global batch sequences (token-weighted).
        Every rank runs the same number of forwards (FSDP needs all ranks in each all-gather)."""
        cfg, env, dev = self.cfg, self.env, self.env.device
        n_val = len(self.val_set)
        if n_val == 0:
            return None
        m = min(n_val, cfg.eval_batches * self.global_batch)  # the same sequences whatever the world size
        order = np.arange(max(m - m % env.world_size, env.world_size)) % n_val
        mine = order[env.rank::env.world_size]
        self.module.eval()
        loss_sum = torch.zeros((), device=dev)
        count = torch.zeros((), device=dev)
        for i in range(0, len(mine), cfg.batch_size):
            b = collate(self.val_set, mine[i:i + cfg.batch_size])
            n = int((b.labels[:, 1:] != IGNORE_INDEX).sum())
            with self._autocast():
                loss = self._loss(b)
            loss_sum += loss.float() * n
            count += n
        self.module.train()
        return float(dist_.all_reduce_sum(loss_sum, env) / dist_.all_reduce_sum(count, env).clamp(min=1))

    def sample_prompts(self) -> list[str]:
        if self.cfg.sample_prompts:
            prompts = self.cfg.sample_prompts
        else:
            prompts = ["Hello! What can you do?"] if self.tokens.kind == "chat" else [""]
        if self.tokens.kind == "chat":
            from gemma3.text.chat import render_chat

            return [render_chat([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
        return prompts

    @torch.no_grad()
    def samples(self) -> list[tuple[str, str]]:
        """(prompt, continuation) for each sample prompt: temperature sampling with a fixed seed, so the
        samples of different steps differ only because the model did. Run on every rank (FSDP forwards are
        collective); fp32, with the KV cache."""
        from gemma3.generation.finish import RowState
        from gemma3.generation.sampling import SamplingParams, mask_padding, next_token
        from gemma3.kv_cache import KVCache

        cfg, dev = self.cfg, self.env.device
        params = SamplingParams(temperature=cfg.sample_temperature, top_k=50, top_p=1.0)
        stops = {self.tokenizer.eos_id, self.tokenizer.end_of_turn_id}
        self.module.eval()
        out = []
        for prompt in self.sample_prompts():
            generator = torch.Generator(device=dev).manual_seed(cfg.seed)
            ids = self.tokenizer.encode(prompt, add_bos=True)
            n_new = max(0, min(cfg.sample_tokens, self.config.max_position_embeddings - len(ids)))
            if n_new == 0:
                out.append((prompt, ""))
                continue
            cache = KVCache(self.config, 1, len(ids) + n_new, torch.float32, dev)
            x = torch.tensor([ids], device=dev)
            row = RowState(stops, cfg.sample_tokens, self.config.max_position_embeddings - len(ids))
            while not row.finished:
                logits = self.module(x, cache=cache, logits_to_keep=1).logits[:, -1].float()
                if not bool(torch.isfinite(logits.sum())):
                    raise TrainingError(f"the model's logits are not finite at step {self.step} (the weights "
                                        f"diverged: lower --lr); {self._last_good()}")
                token = int(next_token(mask_padding(logits, len(self.tokenizer)), params, generator=generator)[0])
                row.push(token)
                x = torch.tensor([[token]], device=dev)
            out.append((prompt, self.tokenizer.decode(row.text_ids)))
        self.module.train()
        return out

    def save(self, train_loss: float | None, eval_loss: float | None) -> Path | None:
        """All ranks gather (FSDP collectives); rank 0 writes."""
        env = self.env
        lora = self.cfg.lora
        if lora is None:
            model_state = dist_.model_state(self.module, env)
        else:
            model_state = None
            full = dist_.model_state(self.module, env)
            adapter_only = {k: v for k, v in full.items() if ".lora_A." in k or ".lora_B." in k}
        optim_state = dist_.optimizer_state(self.module, self.optimizer, env)
        path = None
        if self.main:
            rng = {"torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None}
            state = {**self._resume_identity(), "step": self.step, "tokens_seen": self.tokens_seen,
                     "sequences_seen": self.step * self.global_batch, "train_loss": train_loss,
                     "eval_loss": eval_loss, "unigram_loss": self.unigram,
                     "lr_anchor": list(self.lr_anchor) if self.lr_anchor else None,
                     "train_config": stored_config(self.cfg)}

            def adapter_writer(directory: Path) -> None:
                write_adapter(directory, adapter_only, lora, absolute(self.cfg.model))

            path = ckpt.save_checkpoint(self.out, self.step, config=self.config, model_state=model_state,
                                        write_adapter=adapter_writer if lora else None,
                                        trainer_state={"optimizer": optim_state, "rng": rng},
                                        train_state=state, tokenizer_file=self.tokenizer_file, keep=self.cfg.keep)
        dist_.barrier(env)
        return path

    def run(self) -> TrainResult:
        cfg = self.cfg
        losses: list[float] = []
        evals: dict[int, float] = {}
        last_ckpt = ckpt.latest_checkpoint(self.out) if self.resume_from else None
        sample_every = cfg.sample_every if cfg.sample_every is not None else cfg.eval_every
        train_loss = eval_loss = None
        try:
            if self.step == 0:
                eval_loss = self._eval_and_sample(evals, do_eval=cfg.eval_every > 0, do_sample=sample_every > 0)
            bar = progress_bar(cfg.steps, self.step, cfg.progress and self.main)
            t_last, tokens_last = time.perf_counter(), self.tokens_seen
            while self.step < cfg.steps:
                train_loss, norm = self.train_step()
                losses.append(train_loss)
                now = time.perf_counter()
                tps = (self.tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, self.tokens_seen
                if self.main:
                    self.metrics.log({"step": self.step, "loss": train_loss, "lr": self.lr(self.step - 1),
                                      "grad_norm": norm, "tokens": self.tokens_seen, "tokens_per_s": round(tps, 1)})
                    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                    bar.update(1)
                last = self.step == cfg.steps
                do_eval = cfg.eval_every > 0 and (self.step % cfg.eval_every == 0 or last)
                do_sample = sample_every > 0 and (self.step % sample_every == 0 or last)
                if do_eval or do_sample:
                    result = self._eval_and_sample(evals, do_eval, do_sample)
                    eval_loss = result if result is not None else eval_loss
                if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                    last_ckpt = self.save(train_loss, eval_loss)
                    t_last = time.perf_counter()  # checkpoint time is not training throughput
            bar.close()
        finally:
            if self.main:
                self.metrics.close()
        if self.main:
            png = plot_loss(self.out / METRICS, self.out / LOSS_PNG, self.unigram,
                            title=f"gemma3 train: {self.out.name}")
            if png:
                self._say(f"loss curve: {png}")
            if last_ckpt:
                self._say(f"checkpoint: {last_ckpt}")
        return TrainResult(self.step, last_ckpt, losses, evals, self.unigram)

    def _eval_and_sample(self, evals: dict[int, float], do_eval: bool, do_sample: bool) -> float | None:
        loss = self.evaluate() if do_eval else None
        if loss is not None:
            evals[self.step] = loss
            if self.main:
                self.metrics.log({"step": self.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))})
                self._say(f"step {self.step}: held-out loss {loss:.4f} (perplexity {math.exp(min(loss, 50)):.1f})")
        if do_sample:
            for prompt, text in self.samples():
                if self.main:
                    self.metrics.sample(self.step, prompt, text)
                    self._say(f"step {self.step} sample: {prompt!r} → {text!r}")
        return loss

    def _say(self, message: str) -> None:
        if self.main and self.cfg.progress:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        dist_.shutdown(self.env)


def train(cfg: TrainConfig) -> TrainResult:
    """Run a whole training job (the Python API of `gemma3 train`)."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
