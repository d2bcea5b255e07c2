"""Setting up a training run: the process group and device, the data, the teacher, the student and its
tokenizer, the held-out set (`set_up`); then the student wrapped for the ranks with its optimizer
(`build_learner`). Every check that can refuse the run happens here, before the first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd.cache.reader import CacheReader, CacheUnit
from kd.errors import KdError
from kd.pipeline.evaluation.sequences import unwrap_causal_lm
from kd.pipeline.models import ModelSource, load_causal_lm, load_tokenizer, resolve_model, tokenizer_fingerprint
from kd.pipeline.training import crosstok, multiteacher
from kd.pipeline.training.config import TrainConfig
from kd.pipeline.training.distributed import DistEnv, autocast_dtype, init_distributed, resolve_device
from kd.pipeline.training.features import FeatureProjections, build_feature_projections
from kd.pipeline.training.hidden_teacher import CachedTeacherHead, load_cached_teacher_head
from kd.pipeline.training.inputs import limited_units, open_data
from kd.pipeline.training.optimizer import build_optimizer
from kd.pipeline.training.sharding import shard_with_fsdp2
from kd.pipeline.training.step import DistillStep
from kd.pipeline.training.students import apply_lora, build_student, count_parameters


@dataclass
class Run:
    """Everything a training run is made of before the student is wrapped for the ranks."""

    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    amp: torch.dtype | None
    out: Path
    student: torch.nn.Module
    tokenizer: Any
    layers: Any
    """The teacher layers --student-from-teacher kept (None otherwise)."""
    train_reader: CacheReader
    train_units: list[CacheUnit]
    train_flag: str
    aligner: Any
    """Cross-tokenizer aligner of the cache to the student's tokenizer (None: same tokenizer)."""
    eval_reader: CacheReader | None
    eval_aligner: Any
    """--eval-cache in another tokenizer (--cross-tokenizer): its aligner to the student's (None: same)."""
    cached_head: CachedTeacherHead | None
    """The teacher head of a hidden-state --from-cache (None for any other data)."""
    eval_head: CachedTeacherHead | None
    """The teacher head of a hidden-state --eval-cache."""
    features: FeatureProjections | None
    """--feature-loss: the projections student layer -> cached teacher layer (None without it)."""
    teacher_model: torch.nn.Module | None
    teacher_device: torch.device | None
    trainable: int
    total_params: int


@dataclass
class Learner:
    """The student as it trains: the loss module, its DDP/FSDP2 wrapping, the trainable parameters, AdamW."""

    module: DistillStep
    wrapped: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    fsdp: bool


def set_up(cfg: TrainConfig) -> Run:
    """Join the ranks, seed, and load data, teacher and student (the order fixes what the seed draws)."""
    env = init_distributed()
    device = resolve_device(cfg.device, env)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.out)

    reader = CacheReader(cfg.from_cache) if isinstance(cfg.from_cache, str) else None
    if len(cfg.caches) > 1:  # several teachers: the caches read side by side as one
        reader = multiteacher.open_caches(cfg)
    teacher_source = teacher_source_of(cfg, reader)
    student, tokenizer_source, layers = build_student(
        cfg.student, teacher_source if cfg.student_from_teacher else None, cfg.layers, str(device)
    )
    if tokenizer_source.kind == "config":
        if teacher_source is None and reader is not None:
            teacher_source = resolve_model(reader.settings["teacher"]["path"], "--teacher")
        if teacher_source is None:
            raise KdError("--student config.json has no tokenizer; add --teacher so kd can use the teacher's")
        tokenizer_source = teacher_source
    tokenizer = load_tokenizer(tokenizer_source)
    fingerprint = tokenizer_fingerprint(tokenizer)
    aligner = None
    if reader is not None:
        aligner = check_cache(cfg, reader, tokenizer, fingerprint, env)
        train_reader, train_flag = reader, "--from-cache"
    else:
        train_reader = open_data(cfg.data, "--data", out, "train", tokenizer, cfg, env, weighted=True)
        train_flag = "--data"
    train_units = limited_units(train_reader, cfg.limit)
    teacher_model, teacher_device = load_online_teacher(cfg, teacher_source, fingerprint, device)
    eval_reader, eval_aligner = open_eval_set(cfg, out, tokenizer, fingerprint, env)
    cached_head = load_cached_teacher_head(train_reader, device, train_flag)  # None unless a hidden cache
    eval_head = load_cached_teacher_head(eval_reader, device) if eval_reader is not None else None

    if cfg.lora:
        student = apply_lora(student, cfg.lora)
    # After the student: its random init draws what it draws without --feature-loss too.
    features = build_feature_projections(cfg, reader, unwrap_causal_lm(student))
    if features is not None:
        features.to(device)
    student.train()
    trainable, total_params = count_parameters(student)
    return Run(
        cfg=cfg,
        env=env,
        device=device,
        amp=autocast_dtype(cfg.dtype, device),
        out=out,
        student=student,
        tokenizer=tokenizer,
        layers=layers,
        train_reader=train_reader,
        train_units=train_units,
        train_flag=train_flag,
        aligner=aligner,
        eval_reader=eval_reader,
        eval_aligner=eval_aligner,
        cached_head=cached_head,
        eval_head=eval_head,
        features=features,
        teacher_model=teacher_model,
        teacher_device=teacher_device,
        trainable=trainable,
        total_params=total_params,
    )


def teacher_source_of(cfg: TrainConfig, reader: CacheReader | None) -> ModelSource | None:
    """The teacher: --teacher, or (to cut a student from) the one the cache's manifest names."""
    teacher_source: ModelSource | None = None
    if cfg.teacher is not None:
        teacher_source = resolve_model(cfg.teacher, "--teacher")
    elif reader is not None and cfg.student_from_teacher:
        t = reader.settings["teacher"]
        teacher_source = resolve_model(
            t["path"] if t["kind"] != "gguf" or Path(t["path"]).is_file() else None, "--teacher"
        )
    if cfg.student_from_teacher and teacher_source is None:
        raise KdError("--student-from-teacher needs --teacher (or a cache whose manifest names the teacher)")
    return teacher_source


def check_cache(
    cfg: TrainConfig, reader: CacheReader, tokenizer: Any, fingerprint: str, env: DistEnv | None = None
) -> Any:
    """The cache must hold what --divergence needs and come from the student's tokenizer, unless
    --cross-tokenizer aligns it to the student's by text: then the aligner is returned. Several caches
    are checked one by one, and their collation hook is returned (training/multiteacher.py; its
    per-teacher metrics are added over the ranks of `env`)."""
    if isinstance(reader, multiteacher.CacheSet):
        multiteacher.check_student_tokenizer(cfg, reader, fingerprint)
        aligners = [check_cache(cfg, one, tokenizer, fingerprint) for one in reader.readers]
        return multiteacher.collator_for(cfg, aligners, env)
    aligner = None
    if reader.settings["tokenizer_fingerprint"] != fingerprint:
        if not cfg.cross_tokenizer:
            raise KdError(
                f"--from-cache {cfg.from_cache}: the cache was made with another tokenizer "
                f"({reader.settings['tokenizer_fingerprint']}) than the student's ({fingerprint}); "
                "pass --cross-tokenizer to align the two by text"
            )
        aligner = crosstok.aligner_for(reader, tokenizer, load_tokenizer)
    if reader.mode == "rs" and cfg.divergence != "forward_kl":
        raise KdError(
            f"--divergence {cfg.divergence} needs teacher log-probabilities; an RS cache stores only "
            "sample counts (use a top-k cache)"
        )
    reader.require_temperature(cfg.temperature)  # a top-k cache is exact only at the temperatures it recorded
    return aligner


def load_online_teacher(
    cfg: TrainConfig, teacher_source: ModelSource | None, fingerprint: str, device: torch.device
) -> tuple[torch.nn.Module | None, torch.device | None]:
    """Online KD's frozen teacher and its device (None, None in the other modes)."""
    if cfg.mode != "online":
        return None, None
    teacher_tokenizer = load_tokenizer(teacher_source)
    if tokenizer_fingerprint(teacher_tokenizer) != fingerprint:
        raise KdError("--teacher and --student use different tokenizers; kd distils only within one tokenizer")
    teacher_device = torch.device(cfg.teacher_device) if cfg.teacher_device else device
    teacher_model = load_causal_lm(teacher_source, dtype="auto", device=str(teacher_device)).eval()
    teacher_model.requires_grad_(False)
    return teacher_model, teacher_device


def open_eval_set(cfg: TrainConfig, out: Path, tokenizer, fingerprint: str, env: DistEnv) -> tuple[Any, Any]:
    """The held-out set (--eval-cache, or --eval-data tokenized into OUT/prepared/eval) and its aligner.

    An --eval-cache in another tokenizer is scored as `kd eval --cache --cross-tokenizer` scores it
    (KL and agreement on the aligned targets, CE on all), so --cross-tokenizer covers it too.
    """
    if cfg.eval_cache:
        eval_reader = CacheReader(cfg.eval_cache, flag="--eval-cache")
        if eval_reader.settings["tokenizer_fingerprint"] == fingerprint:
            return eval_reader, None
        if not cfg.cross_tokenizer:
            raise KdError(
                f"--eval-cache {cfg.eval_cache}: made with another tokenizer than the student's "
                "(--cross-tokenizer scores it on the targets the two tokenizations share)"
            )
        return eval_reader, crosstok.aligner_for(eval_reader, tokenizer, load_tokenizer, flag="--eval-cache")
    if cfg.eval_data:
        return open_data(cfg.eval_data, "--eval-data", out, "eval", tokenizer, cfg, env, weighted=False), None
    return None, None


def build_learner(run: Run) -> Learner:
    """The loss module over the student, replicated (DDP) or sharded (FSDP2) under torchrun, and AdamW."""
    cfg, env, device = run.cfg, run.env, run.device
    module = DistillStep(
        run.student, cfg.loss_config(), run.teacher_model, run.teacher_device, run.cached_head, run.features
    )
    wrapped: torch.nn.Module = module
    fsdp = cfg.fsdp and env.world_size > 1
    if fsdp:
        shard_with_fsdp2(module, unwrap_causal_lm(module.student), device, env.world_size)
    elif env.world_size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    params = [p for p in module.parameters() if p.requires_grad]
    return Learner(module, wrapped, params, build_optimizer(params, cfg), fsdp)
