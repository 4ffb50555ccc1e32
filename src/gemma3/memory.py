"""How much memory a device has: asked before allocating a KV cache, a training run or the packed weight copies,
so that what cannot fit is refused with a clear error instead of ending in an out-of-memory kill."""

from __future__ import annotations

import os

import torch


def available_memory(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on `device` (None where that cannot be told)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def physical_memory() -> int | None:
    """The machine's RAM in bytes (None where that cannot be told)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
