"""LoRA (Hu et al. 2021): W x + (alpha / r) · B A x, with W frozen and only A (r × in), B (out × r) trained.

Files are PEFT's, so an adapter trained here loads with `peft.PeftModel.from_pretrained` on transformers'
`Gemma3ForCausalLM`, and PEFT adapters for Gemma 3 load here:

* ``adapter_config.json``: ``peft_type: LORA``, ``r``, ``lora_alpha``, ``target_modules`` ...;
* ``adapter_model.safetensors``: ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``, i.e.
  PEFT's ``base_model.model.`` + the HF module path (``model.`` + ours) + ``.lora_A.weight`` / ``.lora_B.weight``
  (PEFT drops the adapter name "default" when saving).

Initialisation is PEFT's default: A Kaiming-uniform (a = sqrt 5, as nn.Linear), B zeros, so training starts
exactly at the base model. Merging adds (alpha / r) · B A into W; `merge_lora` writes a plain checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. Parameter names match PEFT's (lora_A, lora_B)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.base_layer.weight.requires_grad_(False)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=dtype)

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """PEFT's init: A as nn.Linear's Kaiming-uniform (bound 1/sqrt(in)), B zero, so the update starts at 0."""
        bound = 1.0 / math.sqrt(self.lora_A.in_features)
        self.lora_A.weight.uniform_(-bound, bound, generator=generator)
        self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        """The merged update (alpha / r) · B A, shape of the base weight, in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def apply_lora(model: nn.Module, settings: LoraSettings, generator: torch.Generator | None = None) -> list[str]:
    """Freeze every parameter of `model` and wrap each targeted linear layer in a LoRALinear.
    Returns the wrapped module paths (in our naming, e.g. ``layers.0.self_attn.q_proj``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in settings.targets and isinstance(child, nn.Linear):
                if settings.r > min(child.in_features, child.out_features):
                    raise Gemma3Error(f"LoRA rank {settings.r} is larger than {child_name} itself "
                                      f"({child.out_features} x {child.in_features}): a low-rank update of a "
                                      "higher rank than the weight adds nothing")
                lora = LoRALinear(child, settings.r, settings.alpha, settings.dropout)
                lora.reset_lora(generator)
                setattr(module, child_name, lora)
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise Gemma3Error(f"no linear layer named {', '.join(settings.targets)} in the model")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


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


def load_adapter_into(model: nn.Module, directory: str | Path) -> LoraSettings:
    """Wrap `model` per the adapter's config and copy its weights in (names and shapes checked)."""
    settings, weights, _ = read_adapter(directory)
    apply_lora(model, settings)
    modules = lora_modules(model)
    expected = {f"{n}.{ab}" for n in modules for ab in ("lora_A", "lora_B")}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise CheckpointError(f"{directory}: adapter does not match the model "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for key, tensor in weights.items():
            name, ab = key.rsplit(".", 1)
            param = getattr(modules[name], ab).weight
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(f"{directory}: {key} has shape {tuple(tensor.shape)}, "
                                      f"the model needs {tuple(param.shape)}")
            param.copy_(tensor)
    return settings


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain state dict (our names, no LoRA) with every adapter folded in: W + (alpha / r) · B A."""
    deltas = {f"{name}.weight": m.delta() for name, m in lora_modules(model).items()}
    out = {}
    for key, tensor in model.state_dict().items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        plain = key.replace(".base_layer.", ".")
        if plain in deltas:
            tensor = (tensor.float() + deltas[plain]).to(tensor.dtype)
        out[plain] = tensor
    return out


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


def merge_lora(base: str | None, adapter_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
               progress: bool = True, overwrite: bool = False) -> Path:
    """`gemma3 merge-lora`: base model source + PEFT adapter → a standalone checkpoint directory (config.json,
    model.safetensors, tokenizer files) that loads as a model source everywhere, and in transformers.
    An existing non-empty `out_dir` is refused unless `overwrite` (gemma3.files)."""
    from gemma3.weights.convert import convert

    return convert(base, out_dir, to="hf", dtype=str(dtype).removeprefix("torch."), progress=progress,
                   overwrite=overwrite, lora=adapter_dir, extra_sources=(adapter_dir,), out_flag="-o")


def trainable_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    return (p for p in model.parameters() if p.requires_grad)


def describe(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in trainable_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
