"""Where code runs: the device, the precision context and the ``torchrun`` process group.

One home for what training and evaluation both need: ``resolve_device`` ("auto" -> CUDA when available, else the
CPU), ``autocast_factory`` (bf16 autocast on CUDA, fp32 on CPU), the process group ``torchrun`` describes
(NCCL on GPU, gloo on CPU; one process is the special case W = 1) and the collectives built on it.
"""
from __future__ import annotations

import contextlib
import functools
import os
import random
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError

__all__ = ["world_info", "is_main", "process_age", "init_distributed", "all_gather", "barrier", "close_distributed",
           "resolve_device", "autocast_factory", "seed_everything"]


def world_info() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``: interpreter start-up and imports included), else None."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def is_main() -> bool:
    return world_info()[0] == 0


def init_distributed() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (env WORLD_SIZE > 1): NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = torch.distributed
    if world > 1 and not d.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        d.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return world_info()


def all_gather(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects; ``[obj]`` for one process)."""
    _, world = world_info()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if world_info()[1] > 1:
        torch.distributed.barrier()


def close_distributed(sync: bool) -> None:
    """Leave the process group, if one was joined: ``sync`` (every rank is known to be here: a finished command, an
    agreed preemption) first waits for the other ranks, so that no rank closes its gloo pairs while another still
    uses them (gloo then aborts the survivor: SIGABRT instead of the command's exit status)."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        if sync:
            d.barrier()
        d.destroy_process_group()


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return torch.device(name)


def autocast_factory(device: torch.device, precision: str = "auto"):
    """A zero-argument context factory: bf16 autocast (``auto`` on CUDA) or a null context (``auto`` on CPU)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "bf16":
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    raise UsageError(f"train.precision: unknown precision {precision!r}; valid: auto, bf16, fp32")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
