"""Everything multi-process, in one place (style principle 9): the single-process path never touches it
beyond `DistEnv.single()` and the no-op helpers below.

Launch: ``torchrun --nproc_per_node=N -m gemma3 train ... --distributed {ddp,fsdp}``. torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK; the process group is NCCL on GPUs and gloo on CPU.

* DDP: the model is replicated, gradients all-reduced (averaged) in backward.
* FSDP2 (``fully_shard``, the per-parameter DTensor FSDP), applied as torchtitan's ``parallelize.py`` does:
  one unit per transformer block, then the root module, which leaves the tied embedding and the final norm
  together in the root unit: the embedding is used at both ends of the forward (input lookup and output
  head), so it stays unsharded from the first all-gather to the last use instead of being gathered twice.
  Blocks are sharded first so each owns its parameters; the root then takes whatever is left.

Checkpoints hold *full* (unsharded) tensors, gathered to rank 0 with `torch.distributed.checkpoint`'s
state-dict API, so a checkpoint written by any number of processes loads as a plain model and resumes on
any number of processes. The optimizer state is keyed by parameter name for the same reason.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str | None = None  # None (one process), "ddp" or "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @staticmethod
    def single(device: str | torch.device = "cpu") -> "DistEnv":
        return DistEnv(device=torch.device(device))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(strategy: str | None, device: str) -> DistEnv:
    """Join the process group torchrun set up (if any) and pick this rank's device."""
    if not launched_by_torchrun():
        return DistEnv.single(_pick_device(device, 0))
    from gemma3.errors import Gemma3Error

    strategy = strategy or "ddp"
    if strategy not in STRATEGIES:
        raise Gemma3Error(f"--distributed must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, strategy)


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def shutdown(env: DistEnv) -> None:
    if env.active and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, env: DistEnv) -> nn.Module:
    """The module the training loop calls: the model itself, a DDP wrapper, or the model sharded in place."""
    if not env.active:
        return model
    if env.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:  # one unit per block: gathered just before it runs, freed right after
        fully_shard(block)
    fully_shard(model)  # root unit: the tied embedding (input and output head) with the final norm
    return model


def unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def gradient_sync(model: nn.Module, env: DistEnv, sync: bool):
    """Context for one micro-batch's backward: skip the gradient all-reduce on all but the last micro-batch
    of an accumulation step (the gradients only need averaging once)."""
    if not env.active or sync:
        return contextlib.nullcontext()
    if env.strategy == "ddp":
        return model.no_sync()
    model.set_requires_gradient_sync(False)  # FSDP2: switched back on by the sync=True call below

    @contextlib.contextmanager
    def restore():
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    return restore()


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.active:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's value of `obj` on every rank (e.g. an error message, so all ranks stop together)."""
    if not env.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm, clipped to `max_norm` when > 0. Under FSDP2 the gradients are DTensor shards
    and the norm comes back as a DTensor; `full_tensor()` reduces it across ranks."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


# ------------------------------------------------------------------------------------ full state dicts
def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """Unsharded model tensors on CPU; complete on rank 0 (other ranks may get an empty dict). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if env.strategy != "fsdp":
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return get_model_state_dict(model, options=_options(cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict:
    """The optimizer state keyed by parameter name, unsharded, on CPU (complete on rank 0). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), optimizer, options=_options(cpu_offload=env.active))


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], env: DistEnv) -> None:
    """Load full tensors (every rank passes the same dict); FSDP keeps only each rank's shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if env.strategy != "fsdp":
        unwrap(model).load_state_dict(state, strict=False)
        return
    set_model_state_dict(model, state, options=_options(strict=False))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, env: DistEnv) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(model), optimizer, state, options=_options())
