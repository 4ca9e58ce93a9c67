"""Data parallelism, applied from outside the single-device model.

`torchrun --nproc_per_node N -m atlas train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `setup`
joins the process group (NCCL on GPUs, gloo on CPUs), `wrap` puts DistributedDataParallel
around the model, and the loop asks `mean` for numbers every rank must agree on. With one
process every function here is a no-op, so the loop reads the same either way.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def setup(device: torch.device) -> tuple[int, int]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def accumulating(fwd: torch.nn.Module, last: bool):
    """Skip the gradient all-reduce on every micro-batch but the last of a step."""
    return fwd.no_sync() if isinstance(fwd, DistributedDataParallel) and not last else nullcontext()


def mean(value: float | torch.Tensor) -> float:
    """The mean over ranks of a per-rank number (a host sync: call it at log intervals)."""
    t = torch.as_tensor(value, dtype=torch.float64)
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return float(t)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
