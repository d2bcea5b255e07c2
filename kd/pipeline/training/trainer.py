"""One training loop for every kind of distillation: `kd train`'s library entry point.

Cached KD (`--from-cache`), online KD (`--teacher` + `--data`), CE-only training and reasoning SFT
differ only in where the teacher signal comes from and in the loss object; they share one loop:
AdamW, cosine schedule with warmup and a floor, gradient accumulation, clipping, bf16 autocast,
DDP under torchrun, atomic checkpoints with exact resume, periodic eval, HF-format output.

    from kd.pipeline.training.trainer import TrainConfig, train
    train(TrainConfig(from_cache="cache/", student="S/", out="student/"))

Where each part lives: `config` (TrainConfig), `loop` (train: the loop as named steps), `setup`
(data, teacher, student, wrapping), `inputs` (corpora, tag weights, the plan), `step` (DistillStep,
accumulation and the normalisation rule: loss sums divided once by the global target count),
`optimizer` (AdamW and its schedule), `resume` (checkpoints and the resume contract),
`distributed` (process group, device).
"""

from __future__ import annotations

from kd.pipeline.training.config import TrainConfig
from kd.pipeline.training.distributed import DistEnv, autocast_dtype, init_distributed, resolve_device
from kd.pipeline.training.inputs import THINK_TAGS, TagWeights, build_plan, limited_units, open_data, tag_token_weights
from kd.pipeline.training.loop import save_student, train
from kd.pipeline.training.optimizer import learning_rate_at
from kd.pipeline.training.step import DistillStep

__all__ = [
    "THINK_TAGS",
    "DistEnv",
    "DistillStep",
    "TagWeights",
    "TrainConfig",
    "autocast_dtype",
    "build_plan",
    "init_distributed",
    "learning_rate_at",
    "limited_units",
    "open_data",
    "resolve_device",
    "save_student",
    "tag_token_weights",
    "train",
]
