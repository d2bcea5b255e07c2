"""`TrainConfig`: the settings of `kd train`, validated before anything is written.

Each field's docstring is its --help text (kd/stages/options.py reads them from this source).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.errors import KdError
from kd.losses import TEACHER_MIXES, LossConfig
from kd.pipeline.models import check_dtype
from kd.pipeline.tracking import REPORT_TARGETS
from kd.pipeline.training.multiteacher import parse_teacher_weights
from kd.pipeline.training.optim_settings import OptimizerSettings


@dataclass
class TrainConfig(OptimizerSettings):
    """Settings of `kd train` (each field's docstring is its --help text); the step settings are inherited."""

    out: str
    """Output dir: final student (HF format), checkpoints/, metrics.jsonl, config.yaml."""
    from_cache: list[str] | str | None = None
    """Cache written by `kd cache-logits`: cached KD. Give it more than once to distil several teachers
    (caches of the same corpus; see --teacher-weights and --teacher-mix)."""
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
    feature_loss: str | None = None
    """Feature distillation from a hidden cache made with --hidden-layers: mse or cosine between the student's
    hidden states at mapped layers, through a learned linear projection per pair (trained, checkpointed, not
    exported), and the teacher's cached ones. Added to the logit loss; --alpha 1 keeps CE + features only.
    mse sees the raw states, large in deep layers (SmolLM2's layer 29: mean square ~1100; scale --feature-weight
    down); cosine is scale-free."""
    feature_weight: float = 1.0
    """W: the loss gains W x (per-token feature loss, averaged over the mapped pairs)."""
    feature_map: str | None = None
    """Student layer S onto cached teacher layer T, e.g. 0:8,3:15 (0-based decoder layers) [default: each cached
    teacher layer t onto the student layer at the same relative depth, round((t+1)*Ls/Lt)-1]."""
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
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep."""
    save_dtype: str = "auto"
    """Dtype of the exported student's weights: auto (as trained: float32 on CPU), bfloat16, float16 or
    float32. bfloat16 halves a CPU-trained student on disk; checkpoints keep the training dtype (exact resume)."""
    cross_tokenizer: bool = False
    """Train a student whose tokenizer differs from a --from-cache (or --eval-cache) teacher's: records
    re-tokenized and aligned by text, the divergence on the aligned targets (training/crosstok.py)."""
    teacher_weights: str | None = None
    """With several --from-cache: each teacher's weight in their order, e.g. 0.7,0.3; positive, divided by
    their sum (7,3 is 0.7,0.3) [default: equal]."""
    teacher_mix: str = "sum"
    """With several --from-cache: sum (the weighted sum of each teacher's divergence) or mixture (the
    divergence to the weighted mixture of the teachers, on the union of their cached ids)."""
    eval_cache: str | None = None
    """Held-out cache: CE, KL to teacher, top-1 agreement, ECE."""
    eval_data: str | None = None
    """Held-out corpus (CE, accuracy, ECE; no teacher metrics)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
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
        # Every flag is checked here, before kd/stages/train.py writes anything to --out.
        if isinstance(self.from_cache, list):  # one --from-cache stays the string it always was
            self.from_cache = (self.from_cache[0] if len(self.from_cache) == 1 else self.from_cache) or None
        self._check_sources()
        self._check_teachers()
        self._check_counts()
        self._check_optimizer()
        self._check_numbers()
        self._check_features()
        self._check_out()

    def _check_sources(self) -> None:
        if self.from_cache is None and self.data is None:
            raise KdError("give --from-cache CACHE (cached KD) or --data PATH (online KD with --teacher, or SFT)")
        if self.from_cache is not None and self.data is not None:
            raise KdError("--from-cache and --data are exclusive: the cache already holds the training data")
        if self.student is None and not self.student_from_teacher:
            raise KdError("give --student (model dir, .gguf or config.json) or --student-from-teacher")
        if self.student is not None and self.student_from_teacher:
            raise KdError("--student and --student-from-teacher are exclusive")
        if self.fsdp and self.lora:
            raise KdError("--fsdp with --lora is not supported; LoRA students are small enough for DDP")
        if self.eval_cache is not None and self.eval_data is not None:
            raise KdError("--eval-cache and --eval-data are exclusive")

    def _check_teachers(self) -> None:
        """--teacher-weights and --teacher-mix (kd/pipeline/training/multiteacher.py)."""
        if self.teacher_mix not in TEACHER_MIXES:
            raise KdError(f"--teacher-mix {self.teacher_mix}: expected one of {', '.join(TEACHER_MIXES)}")
        if self.teacher_weights is not None and self.from_cache is None:
            raise KdError("--teacher-weights weighs the teachers of several --from-cache caches; give them")
        parse_teacher_weights(self.teacher_weights, len(self.caches) or 1)

    def _check_counts(self) -> None:
        for name, value in (
            ("--batch-size", self.batch_size),
            ("--shuffle-window", self.shuffle_window),
            ("--prefetch", self.prefetch),
        ):
            if value < 1:
                raise KdError(f"{name} must be >= 1, got {value}")
        for name, optional in (
            ("--schedule-steps", self.schedule_steps),
            ("--max-steps", self.max_steps),
            ("--limit", self.limit),
        ):
            if optional is not None and optional < 1:
                raise KdError(f"{name} must be >= 1, got {optional}")
        for name, value in (
            ("--save-every", self.save_every),
            ("--eval-every", self.eval_every),
        ):
            if value < 0:
                raise KdError(f"{name} must be >= 0, got {value}")
        if self.batch_tokens is not None and self.batch_tokens < 2:
            raise KdError(f"--batch-tokens must be >= 2, got {self.batch_tokens}")

    def _check_numbers(self) -> None:
        # Written as `not x > 0` so that NaN, which fails every comparison, is refused too.
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise KdError(f"--epochs must be a finite number > 0, got {self.epochs}")
        if not (self.tag_weight > 0 and math.isfinite(self.tag_weight)):
            raise KdError(f"--tag-weight must be a finite number > 0, got {self.tag_weight}")
        if self.tag_weight != 1.0 and self.mode != "sft":
            raise KdError("--tag-weight applies to reasoning SFT (--data without --teacher)")
        check_dtype(self.save_dtype, "--save-dtype")
        if self.report_to not in REPORT_TARGETS:
            raise KdError(f"--report-to {self.report_to}: expected one of {', '.join(REPORT_TARGETS)}")

    def _check_features(self) -> None:
        from kd.losses.features import FEATURE_LOSSES

        if self.feature_loss is None:
            if self.feature_map is not None or self.feature_weight != 1.0:
                raise KdError("--feature-map and --feature-weight need --feature-loss mse|cosine")
            return
        if self.feature_loss not in FEATURE_LOSSES:
            raise KdError(f"--feature-loss {self.feature_loss}: expected one of {', '.join(FEATURE_LOSSES)}")
        if not (self.feature_weight > 0 and math.isfinite(self.feature_weight)):
            raise KdError(f"--feature-weight must be a finite number > 0, got {self.feature_weight}")
        if self.from_cache is None:
            raise KdError("--feature-loss needs --from-cache of a hidden cache made with --hidden-layers")
        if self.cross_tokenizer:
            raise KdError("--feature-loss with --cross-tokenizer: the teacher's positions are not the student's")
        if self.fsdp:
            raise KdError("--feature-loss with --fsdp is not supported yet; use DDP (drop --fsdp)")

    def _check_out(self) -> None:
        """--out holds config.yaml, checkpoints and the student: it must not be (inside) a cache kd reads."""
        out = Path(self.out).resolve()
        for flag, cache in [*(("--from-cache", c) for c in self.caches), ("--eval-cache", self.eval_cache)]:
            # Only a real cache (a manifest) is guarded here; of anything else the reader says "not a kd cache".
            if (
                cache is not None
                and (Path(cache) / "manifest.json").is_file()
                and out.is_relative_to(Path(cache).resolve())
            ):
                raise KdError(f"--out {self.out} is {flag} {cache} or inside it; write the student elsewhere")

    @property
    def caches(self) -> list[str]:
        """The --from-cache caches, in order (empty without one)."""
        if self.from_cache is None:
            return []
        return [self.from_cache] if isinstance(self.from_cache, str) else list(self.from_cache)

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
