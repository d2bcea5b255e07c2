"""`OptimizerSettings`: how each optimizer step is taken, shared by `kd train` and `kd on-policy`.

On-policy trains each round with stage two, so both commands take the same step flags; declaring
them once keeps their flags, defaults, --help text and checks from drifting apart. A command's own
settings (data, batches, checkpoints) stay in its own dataclass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kd.errors import KdError
from kd.settings import cli


# kw_only: these fields have defaults, and a subclass's required fields (TrainConfig.out) follow them.
@dataclass(kw_only=True)
class OptimizerSettings:
    """AdamW, its schedule, accumulation and the numerics of a training step (each docstring is --help)."""

    accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = field(default=1e-4, metadata=cli("--learning-rate", "--lr"))
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor as a fraction of the peak learning rate."""
    grad_clip: float = 1.0
    """Max gradient norm (0 disables)."""
    dtype: str = "auto"
    """Training dtype: auto (bf16 autocast on CUDA, fp32 on CPU), bfloat16, float32."""
    chunk_size: int = 1024
    """Target tokens per logits chunk (memory bound)."""
    log_every: int = 10
    """Log training metrics every N steps."""

    def _check_optimizer(self) -> None:
        """Refuse a bad step setting, named by its flag (a subclass's __post_init__ calls this)."""
        for name, value in (("--accumulation-steps", self.accumulation_steps), ("--log-every", self.log_every)):
            if value < 1:
                raise KdError(f"{name} must be >= 1, got {value}")
        if self.warmup_steps < 0:
            raise KdError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        # Written as `not x > 0` so that NaN, which fails every comparison, is refused too.
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise KdError(f"--learning-rate must be a finite number > 0, got {self.learning_rate}")
        if not self.grad_clip >= 0:  # inf is allowed: it clips nothing, as 0 does
            raise KdError(f"--grad-clip must be >= 0, got {self.grad_clip}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise KdError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise KdError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.dtype not in ("auto", "bfloat16", "bf16", "float32", "fp32"):
            raise KdError(f"--dtype {self.dtype}: expected auto, bfloat16 or float32")
