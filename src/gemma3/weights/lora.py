"""LoRA adapter files, PEFT's format, and the merge arithmetic: what any model source may carry.

An adapter trained here loads with `peft.PeftModel.from_pretrained` on transformers' `Gemma3ForCausalLM`, and
PEFT adapters for Gemma 3 load here:

* ``adapter_config.json``: ``peft_type: LORA``, ``r``, ``lora_alpha``, ``target_modules`` ...;
* ``adapter_model.safetensors``: ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``, i.e.
  PEFT's ``base_model.model.`` + the HF module path (``model.`` + ours) + ``.lora_A.weight`` / ``.lora_B.weight``
  (PEFT drops the adapter name "default" when saving).

Merging adds (alpha / r) · B A into W, in fp32, and casts back to W's dtype. The trainable modules themselves
live in gemma3.train.lora.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from gemma3.errors import CheckpointError, Gemma3Error

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model."


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise Gemma3Error(f"LoRA rank must be a positive integer, got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise Gemma3Error(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = sorted(set(self.targets) - set(ALL_LINEAR))
        if unknown or not self.targets:
            raise Gemma3Error(f"unknown LoRA target module(s) {', '.join(unknown) or '(none)'}; "
                              f"choose from {', '.join(ALL_LINEAR)} or all-linear")
        # one canonical order, so equal settings compare equal (resume checks) whatever order they came in
        object.__setattr__(self, "targets", tuple(t for t in ALL_LINEAR if t in self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @staticmethod
    def parse_targets(text: str) -> tuple[str, ...]:
        """"q_proj,v_proj" or "all-linear" → a tuple of module names."""
        if text.strip() in ("all", "all-linear"):
            return ALL_LINEAR
        return tuple(t.strip() for t in text.split(",") if t.strip())


def adapter_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a state dict (our names) under PEFT's names (see the module docstring)."""
    return {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()
            if ".lora_A." in k or ".lora_B." in k}


def adapter_config(settings: LoraSettings, base_model: str | None) -> dict:
    """A PEFT `LoraConfig` as JSON; fields not written take PEFT's defaults."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted(settings.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write_adapter(directory: Path, state: Mapping[str, torch.Tensor], settings: LoraSettings,
                  base_model: str | None) -> None:
    """Write adapter_config.json and adapter_model.safetensors (the LoRA tensors of `state`, a state dict
    with our names) into `directory`; the caller makes the write atomic."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(state), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(settings, base_model), indent=2) + "\n",
                                            encoding="utf-8")


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def _adapter_config(directory: Path) -> dict:
    try:
        cfg = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory}: cannot read {ADAPTER_CONFIG} ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: expected a JSON object")
    return cfg


def adapter_base(directory: str | Path) -> str | None:
    """The base model an adapter names (``base_model_name_or_path``); None means the embedded 270M."""
    base = _adapter_config(Path(directory)).get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise CheckpointError(f"{directory}: base_model_name_or_path must be a string, got {base!r}")
    return base or None


def read_adapter(directory: str | Path) -> tuple[LoraSettings, dict[str, torch.Tensor], str | None]:
    """(settings, {our module path: (A, B)} flattened as "path.lora_A"/"path.lora_B", base model name)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = _adapter_config(directory)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{directory}: peft_type is {cfg.get('peft_type')!r}, only LORA is supported")
    for unsupported in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if cfg.get(unsupported):
            raise CheckpointError(f"{directory}: {unsupported}=true adapters are not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise CheckpointError(f"{directory}: adapters with trained biases or modules_to_save are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(f"{directory}: per-layer rank_pattern/alpha_pattern adapters are not supported")
    targets = cfg.get("target_modules") or ()
    if isinstance(targets, str):  # PEFT also allows a regex / "all-linear" string
        targets = ALL_LINEAR if targets == "all-linear" else tuple(t for t in ALL_LINEAR if t in targets)
    try:
        settings = LoraSettings(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", 8)),
                                dropout=float(cfg.get("lora_dropout", 0.0)), targets=tuple(targets))
    except (KeyError, TypeError, ValueError, Gemma3Error) as e:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: invalid LoRA settings ({e})") from None
    if not math.isfinite(settings.alpha):
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: lora_alpha must be finite, got {settings.alpha}")
    try:
        raw = load_file(str(directory / ADAPTER_WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{directory}: cannot read {ADAPTER_WEIGHTS} ({e})") from None
    weights = {}
    for key, tensor in raw.items():
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{directory}: unexpected tensor {key} in {ADAPTER_WEIGHTS}")
        key = key[len(PEFT_PREFIX):].replace(".default.", ".").removesuffix(".weight")
        weights[key] = tensor
    return settings, weights, cfg.get("base_model_name_or_path")



@torch.no_grad()
def merge_adapter(state: dict[str, torch.Tensor], directory: str | Path) -> LoraSettings:
    """Fold the adapter in `directory` into `state` (our names) in place: W += (alpha / r) · B A, in fp32 and
    cast back to W's dtype. Every adapted module must exist and every shape must fit."""
    settings, weights, _ = read_adapter(directory)
    modules = sorted({key.rsplit(".", 1)[0] for key in weights})
    for name in modules:
        a, b = weights.get(f"{name}.lora_A"), weights.get(f"{name}.lora_B")
        if a is None or b is None or len(weights) != 2 * len(modules):
            raise CheckpointError(f"{directory}: {name} needs both lora_A and lora_B (and nothing else)")
        base = state.get(f"{name}.weight")
        if base is None:
            raise CheckpointError(f"{directory}: the adapter has {name}, which the model does not")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != base.shape:
            raise CheckpointError(f"{directory}: {name} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do "
                                  f"not fit the weight {tuple(base.shape)}")
        delta = (b.float() @ a.float()) * settings.scaling
        state[f"{name}.weight"] = (base.float() + delta).to(base.dtype)
    return settings
