"""Processes and devices: the torchrun process group, this rank's device, the autocast dtype."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join the torchrun process group if launched by torchrun (gloo on CPU; on CUDA nccl, and gloo beside it).

    Why gloo beside nccl: the step's counts and the logged sums are tiny float64 CPU tensors
    (`sum_over_ranks`), and an nccl-only group refuses CPU tensors; "cpu:gloo,cuda:nccl" routes
    each collective by its tensor's device (GPU tensors, the gradients, still go over nccl).
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return DistEnv()
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(cfg_device: str | None, env: DistEnv) -> torch.device:
    if cfg_device:
        return torch.device(cfg_device)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    if dtype in ("bfloat16", "bf16") or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def sum_over_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """`values` summed over every rank, in place (a no-op for one process)."""
    if env.world_size > 1:
        dist.all_reduce(values)
    return values


def gather_from_ranks(value, env: DistEnv) -> list:
    """Every rank's `value` (any picklable object), in rank order; collective under torchrun."""
    if env.world_size == 1:
        return [value]
    values = [None] * env.world_size
    dist.all_gather_object(values, value)
    return values
