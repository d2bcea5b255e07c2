"""How the student is spread over torchrun processes: DDP (a replica each) or FSDP2 (sharded).

DDP keeps a full copy of the student, its gradients and AdamW state on every GPU; FSDP2
(`torch.distributed.fsdp.fully_shard`, `kd train --fsdp`) splits each decoder layer and the
embeddings/head over the ranks, for students that do not fit on one GPU. Both average gradients
over ranks, so the trainer's loss scaling (global token count, × world size) is the same for both.

With FSDP2 every rank holds only shards, so saving and restoring go through full (gathered, CPU)
state dicts; every rank must call those functions, since they are collectives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kd.pipeline.training.students import decoder_layers


def shard_with_fsdp2(module: torch.nn.Module, student_lm: torch.nn.Module, device: torch.device, world_size: int):
    """Shard each decoder layer, then the rest (embeddings, final norm, head) at the root `module`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for layer in decoder_layers(student_lm):
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gathered(module: torch.nn.Module) -> Iterator[None]:
    """Hold the root's parameters unsharded, for code that calls the head outside module.forward (eval)."""
    if not is_fsdp(module):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def full_model_state(student: torch.nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The student's weights as plain fp32 CPU tensors (gathered from all ranks under FSDP2)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = student.state_dict()
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in state.items()}


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(
    module: torch.nn.Module, student: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool
) -> None:
    """Restore weights and AdamW state from a checkpoint written by the functions above."""
    if not fsdp:
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(student, state["model"], options=options)
    set_optimizer_state_dict(module, optimizer, state["optimizer"], options=options)


def plain_copy(student_lm: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded CPU copy of a (possibly FSDP2-sharded) transformers model, for save_pretrained."""
    copy = type(student_lm)(student_lm.config)
    copy.load_state_dict(state, strict=False)
    if getattr(student_lm.config, "tie_word_embeddings", False):
        copy.tie_weights()
    return copy
