"""AdamW, its learning-rate schedule (linear warmup, cosine decay to a floor) and the optimizer step."""

from __future__ import annotations

import math

import torch

from kd.pipeline.training.optim_settings import OptimizerSettings


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))


def learning_rate_at(step: int, cfg: OptimizerSettings, total_steps: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * peak."""
    peak = cfg.learning_rate
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.min_lr_ratio * peak
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(
    params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, grad_clip: float
) -> torch.Tensor:
    """Clip the accumulated gradients (0: no clipping), step, clear them; returns the gradient norm.

    The norm stays a tensor: reading it is a GPU sync, done only on logging steps (`norm_value`).
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def norm_value(grad_norm: torch.Tensor) -> float:
    """The global gradient norm as a float (under FSDP2 it is a DTensor: its full value)."""
    return float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
