"""One training loop for every kind of distillation.

Cached KD (`--from-cache`), online KD (`--teacher` + `--data`), CE-only training and reasoning SFT
differ only in where the teacher signal comes from and in the loss object; they share this loop:
AdamW, cosine schedule with warmup and a floor, gradient accumulation, clipping, bf16 autocast,
DDP under torchrun, atomic checkpoints with exact resume, periodic eval, HF-format output.

Normalisation (the bug TRL had to fix): every micro-batch returns a loss SUM, and it is divided once
by the number of target tokens (or the sum of token weights) of the whole global batch: all
accumulation steps on all ranks. Every rank knows the global batch (the sampler is a pure function
of seed, epoch and step), so no communication is needed for the count.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kd.cache.reader import CacheReader, CacheUnit
from kd.errors import KdError
from kd.losses import DenseTeacher, LossConfig, distill_loss_sum
from kd.pipeline.data import TokenizedExample
from kd.pipeline.evaluation.sequences import evaluate_sequences, unwrap_causal_lm
from kd.pipeline.heads import split_body_and_head
from kd.pipeline.models import ModelSource, load_causal_lm, load_tokenizer, resolve_model, tokenizer_fingerprint
from kd.pipeline.progress import log, make_progress
from kd.pipeline.tracking import MetricsLogger
from kd.pipeline.training import crosstok
from kd.pipeline.training.batches import Batch
from kd.pipeline.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kd.pipeline.training.order import EpochPlan, OrderSettings
from kd.pipeline.training.prepared import prepare_corpus
from kd.pipeline.training.sharding import (
    full_model_state,
    full_optimizer_state,
    gathered,
    load_full_state,
    plain_copy,
    shard_with_fsdp2,
)
from kd.pipeline.training.stream import StepLoader
from kd.pipeline.training.students import apply_lora, build_student, count_parameters
from kd.settings import cli

THINK_TAGS = ("<think>", "</think>")


@dataclass
class TrainConfig:
    """Settings of `kd train` (each field's docstring is its --help text)."""

    out: str
    """Output dir: final student (HF format), checkpoints/, metrics.jsonl, config.yaml."""
    from_cache: str | None = None
    """Cache written by `kd cache-logits`: cached KD."""
    teacher: str | None = None
    """Live teacher for online KD (with --data and --alpha < 1), or the model --student-from-teacher cuts."""
    data: str | None = None
    """Training corpus for online KD (with --teacher) or plain SFT / reasoning SFT (without, or --alpha 1)."""
    data_format: str | None = None
    """Force the record format of --data instead of detecting it."""
    student: str | None = None
    """Student: HF dir, .gguf, or config.json (random init)."""
    student_from_teacher: bool = False
    """Build the student from the teacher's embeddings, chosen --layers, final norm and head."""
    layers: str | None = None
    """Teacher layers kept by --student-from-teacher, e.g. 0,10,20,29 or even:8 [default: even:8]."""
    alpha: float = 0.5
    """Loss = alpha*CE + (1-alpha)*T^2*divergence."""
    temperature: float = 1.0
    """Distillation temperature T (> 0)."""
    divergence: str = "forward_kl"
    """forward_kl, reverse_kl, jsd or tvd."""
    jsd_beta: float = 0.5
    """beta of the generalized JSD."""
    epochs: float = 1.0
    """Passes over the data (ignored with --max-steps)."""
    max_steps: int | None = None
    """Optimizer steps (overrides --epochs)."""
    batch_size: int = 4
    """Sequences per micro-batch per process."""
    batch_tokens: int | None = None
    """Fill each micro-batch up to this many padded tokens (longest x count) instead of --batch-size sequences."""
    shuffle_window: int = 1024
    """Sequences shuffled together; the data path holds about this many (see kd/pipeline/training/order.py)."""
    prefetch: int = 2
    """Steps decoded ahead of the training loop on a background thread."""
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
    """auto (bf16 autocast on CUDA, fp32 on CPU), bfloat16, float32."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep."""
    cross_tokenizer: bool = False
    """Train a student whose tokenizer differs from the cache's teacher, aligned by text (training/crosstok.py)."""
    eval_cache: str | None = None
    """Held-out cache: CE, KL to teacher, top-1 agreement, ECE."""
    eval_data: str | None = None
    """Held-out corpus (CE, accuracy, ECE; no teacher metrics)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    log_every: int = 10
    """Log metrics every N steps."""
    resume: bool = False
    """Continue from the newest checkpoint in --out."""
    init_from: str | None = None
    """Start from this checkpoint (a checkpoints/step-N directory, or a training --out whose newest one
    is taken): its weights, AdamW state and step count, so a schedule continues across runs."""
    schedule_steps: int | None = None
    """Length of the learning-rate schedule in optimizer steps (default: the last step of this run)."""
    lora: int | None = None
    """Train LoRA adapters of this rank (peft) instead of all weights."""
    fsdp: bool = False
    """Under torchrun, shard the student with FSDP2 instead of replicating it with DDP."""
    seed: int = 0
    """Seed of data order and initialisation."""
    chunk_size: int = 1024
    """Target tokens per logits chunk (memory bound)."""
    max_seq_len: int = 2048
    """Longest sequence for --data."""
    tag_weight: float = 1.0
    """Reasoning SFT: CE weight of the <think>/</think> tag tokens (MiniMind used 10)."""
    report_to: str = "none"
    """none, tensorboard or wandb (metrics.jsonl is always written)."""
    device: str | None = None
    """cpu, cuda, cuda:1 [default: cuda:$LOCAL_RANK if available]."""
    teacher_device: str | None = None
    """Put the online teacher on its own device."""
    limit: int | None = None
    """Use only the first N sequences."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.from_cache is None and self.data is None:
            raise KdError("give --from-cache CACHE (cached KD) or --data PATH (online KD with --teacher, or SFT)")
        if self.from_cache is not None and self.data is not None:
            raise KdError("--from-cache and --data are exclusive: the cache already holds the training data")
        if self.student is None and not self.student_from_teacher:
            raise KdError("give --student (model dir, .gguf or config.json) or --student-from-teacher")
        if self.student is not None and self.student_from_teacher:
            raise KdError("--student and --student-from-teacher are exclusive")
        for name, value in (
            ("--batch-size", self.batch_size),
            ("--accumulation-steps", self.accumulation_steps),
            ("--shuffle-window", self.shuffle_window),
            ("--prefetch", self.prefetch),
        ):
            if value < 1:
                raise KdError(f"{name} must be >= 1, got {value}")
        if self.batch_tokens is not None and self.batch_tokens < 2:
            raise KdError(f"--batch-tokens must be >= 2, got {self.batch_tokens}")
        if self.learning_rate <= 0:
            raise KdError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.epochs <= 0:
            raise KdError(f"--epochs must be > 0, got {self.epochs}")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise KdError(f"--schedule-steps must be >= 1, got {self.schedule_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise KdError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.grad_clip < 0:
            raise KdError(f"--grad-clip must be >= 0, got {self.grad_clip}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise KdError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.dtype not in ("auto", "bfloat16", "bf16", "float32", "fp32"):
            raise KdError(f"--dtype {self.dtype}: expected auto, bfloat16 or float32")
        if self.tag_weight <= 0:
            raise KdError(f"--tag-weight must be > 0, got {self.tag_weight}")
        if self.tag_weight != 1.0 and self.mode != "sft":
            raise KdError("--tag-weight applies to reasoning SFT (--data without --teacher)")
        if self.fsdp and self.lora:
            raise KdError("--fsdp with --lora is not supported; LoRA students are small enough for DDP")
        if self.eval_cache is not None and self.eval_data is not None:
            raise KdError("--eval-cache and --eval-data are exclusive")

    @property
    def mode(self) -> str:
        """cached, online or sft."""
        if self.from_cache is not None:
            return "cached"
        # With --alpha 1 the teacher is not needed as a signal (it may still be the model that
        # --student-from-teacher cuts), so that is plain SFT.
        return "online" if self.teacher is not None and self.alpha < 1.0 else "sft"

    def loss_config(self) -> LossConfig:
        return LossConfig(
            alpha=self.alpha,
            temperature=self.temperature,
            divergence=self.divergence,
            jsd_beta=self.jsd_beta,
            chunk_size=self.chunk_size,
        )


# ----------------------------------------------------------------------------- data


def tag_token_weights(tokenized: TokenizedExample, tag_weight: float) -> np.ndarray:
    """Per-token weights: `tag_weight` on exactly the tokens that spell <think> or </think>, 1 elsewhere.

    MiniMind's reasoning trainer up-weighted every token id that appears in the tags ('<', 'think',
    '>' ...) wherever it occurred; here only the tokens whose character span overlaps a tag count,
    found through the offsets the tokenizer gave when the example was tokenized.
    """
    weights = np.ones(len(tokenized.input_ids), dtype=np.float32)
    if tag_weight == 1.0:
        return weights
    text = tokenized.text
    spans = []
    for tag in THINK_TAGS:
        start = text.find(tag)
        while start != -1:
            spans.append((start, start + len(tag)))
            start = text.find(tag, start + 1)
    for t, (a, b) in enumerate(tokenized.offsets):
        if b > a and any(a < e and b > s for s, e in spans):
            weights[t] = tag_weight
    return weights


class TagWeights:
    """Per-token CE weights for prepared corpora (a callable with a fingerprint for the prepared manifest)."""

    def __init__(self, tag_weight: float) -> None:
        self.tag_weight = tag_weight
        self.fingerprint = f"think-tags:{tag_weight}"

    def __call__(self, tokenized: TokenizedExample) -> np.ndarray:
        return tag_token_weights(tokenized, self.tag_weight)


def open_data(
    path: str, flag: str, out: Path, name: str, tokenizer, cfg: TrainConfig, env: DistEnv, weighted: bool
) -> CacheReader:
    """Tokenize a --data / --eval-data corpus into OUT/prepared/NAME (rank 0; others wait) and open it."""
    prepared = out / "prepared" / name
    weights = TagWeights(cfg.tag_weight) if weighted and cfg.tag_weight != 1.0 else None

    def prepare() -> CacheReader:
        return prepare_corpus(
            path,
            prepared,
            tokenizer,
            flag=flag,
            data_format=cfg.data_format,
            max_seq_len=cfg.max_seq_len,
            limit=cfg.limit if name == "train" else None,
            weights_of=weights,
        )

    if env.world_size == 1:
        return prepare()
    failure = None
    if env.is_main:
        try:
            prepare()
        except KdError as exc:  # every rank must reach the barrier, then all fail with the same message
            failure = str(exc)
    box = [failure]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise KdError(box[0])
    return CacheReader(prepared, flag=flag)


def limited_units(reader: CacheReader, limit: int | None) -> list[CacheUnit]:
    """The reader's units, cut to the first `limit` sequences (the last unit possibly partly)."""
    units = reader.units()
    if limit is None:
        return units
    kept, rows = [], 0
    for unit in units:
        if rows >= limit:
            break
        take = min(unit.rows, limit - rows)
        kept.append(unit if take == unit.rows else CacheUnit(unit.shard, unit.batch, take, unit.targets, unit.rows))
        rows += take
    return kept


def build_plan(reader: CacheReader, units: list[CacheUnit], cfg: TrainConfig, env: DistEnv, flag: str) -> EpochPlan:
    """The data order of this run (identical on every rank); checks --batch-tokens against the data."""
    settings = OrderSettings(
        seed=cfg.seed,
        shuffle_window=cfg.shuffle_window,
        micro_per_step=cfg.accumulation_steps * env.world_size,
        batch_size=None if cfg.batch_tokens else cfg.batch_size,
        batch_tokens=cfg.batch_tokens,
    )
    lengths = None
    if cfg.batch_tokens:
        lengths = reader.sequence_lengths(units)
        longest = max(int(x.max()) for x in lengths if len(x))
        if longest > cfg.batch_tokens:
            raise KdError(
                f"--batch-tokens {cfg.batch_tokens} is smaller than the longest sequence in {flag} {reader.dir} "
                f"({longest} tokens); raise --batch-tokens to at least {longest}"
            )
    return EpochPlan([u.rows for u in units], settings, lengths)


# ----------------------------------------------------------------------------- model + loss


class DistillStep(torch.nn.Module):
    """Student forward + loss in one module, so DDP sees (and synchronises) the whole computation.

    forward(batch) -> LossParts with SUMS over the batch's targets. The teacher (online KD) is held
    outside the module's parameters: it is frozen, in eval mode and run under no_grad.
    """

    def __init__(
        self,
        student: torch.nn.Module,
        loss_config: LossConfig,
        teacher=None,
        teacher_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.loss_config = loss_config
        self._teacher = [teacher] if teacher is not None else []  # a list hides it from Module/DDP
        self.teacher_device = teacher_device
        if teacher is not None:
            self._teacher_parts = split_body_and_head(teacher)  # body, head, post-head transform

    def forward(self, batch: Batch):
        lm = unwrap_causal_lm(self.student)
        body, head, transform = split_body_and_head(lm)
        hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        hidden = hidden[batch.hidden_rows, batch.hidden_cols]
        teacher_signal = batch.teacher
        if self._teacher:
            teacher_body, teacher_head, teacher_transform = self._teacher_parts
            device = self.teacher_device or batch.input_ids.device
            with torch.no_grad():
                teacher_hidden = teacher_body(
                    input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
                ).last_hidden_state
                teacher_hidden = teacher_hidden[batch.hidden_rows.to(device), batch.hidden_cols.to(device)]
            teacher_signal = DenseTeacher(
                teacher_hidden=teacher_hidden.to(hidden.device),
                teacher_head_weight=teacher_head.weight.to(hidden.device),
                teacher_head_bias=None if teacher_head.bias is None else teacher_head.bias.to(hidden.device),
                teacher_logit_transform=teacher_transform,
            )
        if batch.teacher_rows is not None:  # cross-tokenizer: the divergence only where aligned
            return crosstok.loss_sum(
                distill_loss_sum, hidden, head.weight, head.bias, batch.labels, teacher_signal,
                self.loss_config, batch.token_weights, transform, batch.teacher_rows,
            )  # fmt: skip
        return distill_loss_sum(
            hidden,
            head.weight,
            head.bias,
            batch.labels,
            teacher_signal,
            self.loss_config,
            token_weights=batch.token_weights,
            student_logit_transform=transform,
        )


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return DistEnv()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
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


def learning_rate_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * peak."""
    peak = cfg.learning_rate
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.min_lr_ratio * peak
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training; returns the final metrics. Only rank 0 writes files.

    Running out of memory becomes a one-line KdError with the knobs that help, not an allocator trace.
    """
    try:
        return _train(cfg)
    except torch.OutOfMemoryError as error:
        raise KdError(
            "the student does not fit in GPU memory "
            f"({str(error).splitlines()[0][:160]}); lower --batch-size or --max-seq-len (raise "
            "--accumulation-steps to keep the global batch), lower --chunk-size, use --dtype bfloat16 or --lora"
        ) from error
    except RuntimeError as error:
        if "can't allocate memory" not in str(error) and "not enough memory" not in str(error):
            raise
        raise KdError(
            "the student does not fit in memory; lower --batch-size or --max-seq-len, or use --lora"
        ) from error


def _train(cfg: TrainConfig) -> dict[str, Any]:
    launched = time.perf_counter()
    env = init_distributed()
    device = resolve_device(cfg.device, env)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.out)

    # Data and the teacher it implies.
    reader = CacheReader(cfg.from_cache) if cfg.from_cache else None
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
    if reader is not None and reader.settings["tokenizer_fingerprint"] != fingerprint:
        if not cfg.cross_tokenizer:
            raise KdError(
                f"--from-cache {cfg.from_cache}: the cache was made with another tokenizer "
                f"({reader.settings['tokenizer_fingerprint']}) than the student's ({fingerprint}); "
                "pass --cross-tokenizer to align the two by text"
            )
        aligner = crosstok.aligner_for(reader, tokenizer, load_tokenizer)
    if reader is not None:
        if reader.mode == "rs" and cfg.divergence != "forward_kl":
            raise KdError(
                f"--divergence {cfg.divergence} needs teacher log-probabilities; an RS cache stores only "
                "sample counts (use a top-k cache)"
            )
        train_reader, train_flag = reader, "--from-cache"
    else:
        train_reader = open_data(cfg.data, "--data", out, "train", tokenizer, cfg, env, weighted=True)
        train_flag = "--data"
    train_units = limited_units(train_reader, cfg.limit)

    teacher_model = None
    teacher_device = None
    if cfg.mode == "online":
        teacher_tokenizer = load_tokenizer(teacher_source)
        if tokenizer_fingerprint(teacher_tokenizer) != fingerprint:
            raise KdError("--teacher and --student use different tokenizers; kd distils only within one tokenizer")
        teacher_device = torch.device(cfg.teacher_device) if cfg.teacher_device else device
        teacher_model = load_causal_lm(teacher_source, dtype="auto", device=str(teacher_device)).eval()
        teacher_model.requires_grad_(False)

    eval_reader = None
    if cfg.eval_cache:
        eval_reader = CacheReader(cfg.eval_cache, flag="--eval-cache")
        if eval_reader.settings["tokenizer_fingerprint"] != fingerprint:
            raise KdError(f"--eval-cache {cfg.eval_cache}: made with another tokenizer than the student's")
    elif cfg.eval_data:
        eval_reader = open_data(cfg.eval_data, "--eval-data", out, "eval", tokenizer, cfg, env, weighted=False)

    if cfg.lora:
        student = apply_lora(student, cfg.lora)
    student.train()
    trainable, total_params = count_parameters(student)

    plan = build_plan(train_reader, train_units, cfg, env, train_flag)
    steps_per_epoch = plan.steps_in_epoch(0)
    if steps_per_epoch == 0:
        size = f"--batch-tokens {cfg.batch_tokens}" if cfg.batch_tokens else f"--batch-size {cfg.batch_size}"
        raise KdError(
            f"{plan.num_sequences} training sequences are fewer than one global batch ({size} x "
            f"--accumulation-steps {cfg.accumulation_steps} x {env.world_size} processes); lower them"
        )
    run_steps = cfg.max_steps or max(1, plan.total_steps(cfg.epochs))
    loader = StepLoader(
        train_reader, plan, train_units, env.rank, env.world_size, cfg.accumulation_steps, cfg.prefetch, aligner
    )

    module = DistillStep(student, cfg.loss_config(), teacher_model, teacher_device)
    wrapped: torch.nn.Module = module
    fsdp = cfg.fsdp and env.world_size > 1
    if fsdp:
        shard_with_fsdp2(module, unwrap_causal_lm(module.student), device, env.world_size)
    elif env.world_size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    # Steps are counted globally: a run that starts --init-from a checkpoint at step B trains steps
    # [B, B + run_steps); the data plan of this run is indexed from B.
    base_step = 0
    if cfg.init_from:
        source_checkpoint = Path(cfg.init_from)
        if not (source_checkpoint / "state.pt").is_file():
            source_checkpoint = latest_checkpoint(source_checkpoint) or source_checkpoint
        state = load_checkpoint(source_checkpoint)
        load_full_state(module, module.student, optimizer, state, fsdp)
        set_rng_state(state["rng"])
        base_step = int(state["step"])
    total_steps = base_step + run_steps
    schedule_steps = cfg.schedule_steps or total_steps
    start_step = base_step
    if cfg.resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            log(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
        else:
            state = load_checkpoint(checkpoint)
            if state["config_fingerprint"] != _config_fingerprint(cfg):
                raise KdError(f"--resume: {checkpoint} was written with different settings; use another --out")
            if state.get("data", {}).get("plan") not in (None, plan.fingerprint()):
                raise KdError(
                    f"--resume: {checkpoint} was trained on another data layout (the cache or corpus changed); "
                    "use another --out"
                )
            load_full_state(module, module.student, optimizer, state, fsdp)
            set_rng_state(state["rng"])
            start_step = int(state["step"])
            log(f"resumed from {checkpoint} (step {start_step})")

    logger = MetricsLogger(
        out, cfg.report_to, asdict(cfg), resume_step=start_step if cfg.resume else None, enabled=env.is_main
    )
    if env.is_main:
        log(
            f"training {cfg.mode} student: {trainable:,} trainable / {total_params:,} params"
            + (f", layers {layers}" if layers else "")
            + f"; {plan.num_sequences} sequences, {total_steps} steps of "
            + (
                f"{cfg.batch_tokens} tokens x {cfg.accumulation_steps * env.world_size} micro-batches"
                if cfg.batch_tokens
                else f"{cfg.batch_size * cfg.accumulation_steps * env.world_size} sequences"
            )
        )
    amp = autocast_dtype(cfg.dtype, device)

    def evaluate_and_log(step: int) -> dict[str, float]:
        """Held-out metrics at `step` (every rank takes part: under FSDP2 the head is gathered)."""
        with gathered(module):
            metrics = evaluate_sequences(
                module.student, eval_reader.iter_sequences(), cfg.batch_size, cfg.chunk_size, device, amp
            )
        prefixed = {f"eval_{k}": v for k, v in metrics.items()}
        logger.log({"step": step, **prefixed}, console=False)
        return prefixed

    last_metrics: dict[str, Any] = {}
    tokens_seen = 0
    first_step_seconds: float | None = None
    started = time.perf_counter()
    with make_progress("step") as progress:
        task = progress.add_task("train", total=total_steps, completed=start_step)
        for step, data in enumerate(loader.iterate(start_step - base_step, run_steps), start=start_step):
            # The loss is normalised by the global target count (token-weight sum for tagged SFT).
            # Each rank decoded only its own micro-batches, so the count is all-reduced before the
            # first backward: one tiny collective per step.
            counts = torch.tensor(
                [data.weight_sum, data.targets, data.real_tokens, data.padded_tokens], dtype=torch.float64
            )
            if env.world_size > 1:
                dist.all_reduce(counts)
            normaliser, tokens = float(counts[0]), float(counts[1])
            lr = learning_rate_at(step, cfg, schedule_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums = torch.zeros(3, dtype=torch.float64)
            step_start = time.perf_counter()
            for micro, batch in enumerate(data.micro_batches):
                batch = batch.to(device)
                sync = contextlib.nullcontext()
                last_micro = micro == cfg.accumulation_steps - 1
                if fsdp:
                    module.set_requires_gradient_sync(last_micro)
                elif env.world_size > 1 and not last_micro:
                    sync = wrapped.no_sync()
                with sync:
                    with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        parts = wrapped(batch)
                    # Each backward adds a gradient sum; dividing by the global token count here means
                    # the accumulated gradient is the global mean. DDP averages over ranks, so scale
                    # by world_size to turn that average back into a sum.
                    (parts.total * (env.world_size / normaliser)).backward()
                sums += torch.tensor(
                    [float(parts.total.detach()), float(parts.ce), float(parts.divergence)], dtype=torch.float64
                )
            if env.world_size > 1:
                dist.all_reduce(sums)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += int(tokens)
            progress.advance(task)
            done = step + 1
            if first_step_seconds is None:  # model load + data planning + first step: what a user waits for
                first_step_seconds = time.perf_counter() - launched
            if done % cfg.log_every == 0 or done == total_steps:
                elapsed = time.perf_counter() - started
                last_metrics = {
                    "step": done,
                    "epoch": round(data.epoch + (data.step_in_epoch + 1) / plan.steps_in_epoch(data.epoch), 4),
                    "loss": float(sums[0]) / normaliser,
                    "ce": float(sums[1]) / tokens,
                    "divergence": float(sums[2]) / tokens,
                    "lr": lr,
                    "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                    "step_seconds": time.perf_counter() - step_start,
                    "tokens_per_second": tokens_seen / elapsed,
                    "padding": 1.0 - float(counts[2]) / float(counts[3]),
                    "data_wait_share": loader.stats.wait_seconds / elapsed,
                    **(aligner.stats.metrics() if aligner is not None else {}),
                }
                logger.log(last_metrics, console=False)
            if eval_reader is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == total_steps):
                last_metrics.update(evaluate_and_log(done))
            if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
                _save(out, done, module, optimizer, cfg, env, fsdp, plan, base_step)
    if eval_reader is not None and not cfg.eval_every:
        last_metrics.update(evaluate_and_log(total_steps))
    final_state = _save(out, total_steps, module, optimizer, cfg, env, fsdp, plan, base_step)
    if env.is_main:
        student_to_save = plain_copy(unwrap_causal_lm(module.student), final_state) if fsdp else module.student
        save_student(student_to_save, tokenizer, out, cfg, last_metrics, layers)
    logger.close()
    if env.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {
        "out": str(out),
        "steps": total_steps,
        "trainable_parameters": trainable,
        "seconds_to_first_step": first_step_seconds,
        "data_wait_seconds": loader.stats.wait_seconds,
        **last_metrics,
    }


def _config_fingerprint(cfg: TrainConfig) -> str:
    """Settings that must not change across --resume (everything but bookkeeping flags)."""
    ignore = {
        "resume",
        "save_every",
        "keep_checkpoints",
        "eval_every",
        "log_every",
        "report_to",
        "max_steps",
        "extra",
        "prefetch",
    }
    relevant = {k: v for k, v in asdict(cfg).items() if k not in ignore}
    return json.dumps(relevant, sort_keys=True)


def _save(
    out: Path,
    step: int,
    module: DistillStep,
    optimizer,
    cfg: TrainConfig,
    env: DistEnv,
    fsdp: bool,
    plan: EpochPlan,
    base_step: int = 0,
) -> dict[str, torch.Tensor]:
    """Write a checkpoint (rank 0) and return the full student weights. Collective under FSDP2."""
    model_state = full_model_state(module.student, fsdp)
    optimizer_state = full_optimizer_state(module, optimizer, fsdp)
    if env.is_main:
        save_checkpoint(
            out,
            step,
            {
                "step": step,
                "model": model_state,
                "optimizer": optimizer_state,
                "rng": rng_state(),
                "config_fingerprint": _config_fingerprint(cfg),
                # The stream position: steps done in the plan (epoch, step inside it) and which plan.
                "data": {
                    "plan": plan.fingerprint(),
                    "base_step": base_step,
                    "position": list(plan.locate(step - base_step)),
                },
            },
            keep=cfg.keep_checkpoints,
        )
    if env.world_size > 1:
        dist.barrier()
    return model_state


def save_student(student, tokenizer, out: Path, cfg: TrainConfig, metrics: dict[str, Any], layers) -> None:
    """Write the student as a Hugging Face directory (safetensors, tokenizer, chat template)."""
    model = student
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = unwrap_causal_lm(model)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    summary = {"config": asdict(cfg), "layers_from_teacher": layers, "final_metrics": metrics}
    (out / "kd_training.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
