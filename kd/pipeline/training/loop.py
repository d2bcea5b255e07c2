"""The training loop, as the recipe reads: set up, plan, restore; for each step fetch, forward/backward
with accumulation, optimizer step, log, evaluate, checkpoint; finish.

The details live beside it: `setup` (data, teacher, student, wrapping), `inputs` (corpora, the plan),
`step` (the loss module, accumulation and the normalisation rule), `optimizer` (AdamW, schedule),
`resume` (checkpoints and the resume contract), `stream` (the loader).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kd.errors import KdError
from kd.pipeline.evaluation.sequences import evaluate_sequences, unwrap_causal_lm
from kd.pipeline.models import resolve_dtype
from kd.pipeline.progress import log, make_progress
from kd.pipeline.tracking import MetricsLogger
from kd.pipeline.training.config import TrainConfig
from kd.pipeline.training.inputs import plan_steps
from kd.pipeline.training.optimizer import learning_rate_at, norm_value, optimizer_step, set_learning_rate
from kd.pipeline.training.order import EpochPlan
from kd.pipeline.training.resume import Position, restore, save
from kd.pipeline.training.setup import Learner, Run, build_learner, set_up
from kd.pipeline.training.sharding import gathered, plain_copy
from kd.pipeline.training.step import StepCounts, forward_backward, global_counts
from kd.pipeline.training.stream import StepData, StepLoader


def train(cfg: TrainConfig, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run training; returns the final metrics. Only rank 0 writes files.

    `on_start` runs on rank 0 once every check has passed, just before the first step (`kd train`
    writes OUT/config.yaml there, so a refused run leaves none behind).
    Running out of memory becomes a one-line KdError with the knobs that help, not an allocator trace.
    """
    try:
        return _train(cfg, on_start)
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


def _train(cfg: TrainConfig, on_start: Callable[[], None] | None) -> dict[str, Any]:
    """Set up, plan, restore; per step: fetch, count, forward/backward, optimizer step, log, eval, save; finish."""
    clock = Clock()
    run = set_up(cfg)
    env = run.env
    plan, run_steps = plan_steps(run.train_reader, run.train_units, cfg, env, run.train_flag)
    loader = StepLoader(
        run.train_reader,
        plan,
        run.train_units,
        env.rank,
        env.world_size,
        cfg.accumulation_steps,
        prefetch=cfg.prefetch,
        align=run.aligner,
    )
    learner = build_learner(run)
    position = restore(cfg, run.out, learner.module, learner.optimizer, learner.fsdp, plan, env, run_steps)
    resume_step = position.start_step if cfg.resume else None
    logger = MetricsLogger(run.out, cfg.report_to, asdict(cfg), resume_step=resume_step, enabled=env.is_main)
    if env.is_main:
        announce(run, plan, position)
        if on_start is not None:
            on_start()

    last_metrics: dict[str, Any] = {}
    clock.start()
    with make_progress("step") as progress:
        task = progress.add_task("train", total=position.total_steps, completed=position.start_step)
        steps = loader.iterate(position.start_step - position.base_step, run_steps)
        for step, data in enumerate(steps, start=position.start_step):
            counts = global_counts(data, env)
            lr = learning_rate_at(step, cfg, position.schedule_steps)
            set_learning_rate(learner.optimizer, lr)
            clock.step_started()
            sums = forward_backward(
                data, counts, learner.module, learner.wrapped, run.device, run.amp, env, learner.fsdp
            )
            grad_norm = optimizer_step(learner.params, learner.optimizer, cfg.grad_clip)
            clock.step_done(counts)
            progress.advance(task)
            done = step + 1
            if due(done, cfg.log_every, position.total_steps):
                last_metrics = step_metrics(done, data, plan, counts, sums, lr, grad_norm, clock, loader)
                logger.log(last_metrics, console=False)
            if run.eval_reader is not None and due(done, cfg.eval_every, position.total_steps):
                last_metrics.update(evaluate(run, learner, logger, done))
            if cfg.save_every and done % cfg.save_every == 0 and done < position.total_steps:
                save(run.out, done, learner.module, learner.optimizer, cfg, env, learner.fsdp, plan, position)
    if run.eval_reader is not None and not cfg.eval_every:
        last_metrics.update(evaluate(run, learner, logger, position.total_steps))
    return finish(run, learner, plan, position, logger, last_metrics, clock, loader)


def due(done: int, every: int, total: int) -> bool:
    """True every `every` steps and at the last step; never when `every` is 0."""
    return bool(every) and (done % every == 0 or done == total)


@dataclass
class Clock:
    """Wall-clock figures of a run: time to the first step, throughput since the loop began."""

    launched: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    step_start: float = 0.0
    tokens_seen: int = 0
    first_step_seconds: float | None = None
    """Model load + data planning + first step: what a user waits for."""

    def start(self) -> None:
        self.started = time.perf_counter()

    def step_started(self) -> None:
        self.step_start = time.perf_counter()

    def step_done(self, counts: StepCounts) -> None:
        self.tokens_seen += int(counts.targets)
        if self.first_step_seconds is None:
            self.first_step_seconds = time.perf_counter() - self.launched


def announce(run: Run, plan: EpochPlan, position: Position) -> None:
    """One line: what is trained, on how much data, in how many steps of what size."""
    cfg, world = run.cfg, run.env.world_size
    log(
        f"training {cfg.mode} student: {run.trainable:,} trainable / {run.total_params:,} params"
        + (f", layers {run.layers}" if run.layers else "")
        + f"; {plan.num_sequences} sequences, {position.total_steps} steps of "
        + (
            f"{cfg.batch_tokens} tokens x {cfg.accumulation_steps * world} micro-batches"
            if cfg.batch_tokens
            else f"{cfg.batch_size * cfg.accumulation_steps * world} sequences"
        )
    )


def step_metrics(
    done: int,
    data: StepData,
    plan: EpochPlan,
    counts: StepCounts,
    sums: torch.Tensor,
    lr: float,
    grad_norm: torch.Tensor,
    clock: Clock,
    loader: StepLoader,
) -> dict[str, Any]:
    """The logged record of a step. `ce` and `divergence` are per-token means weighted as the loss is
    (Σw·CE/Σw with --tag-weight; plain means otherwise, where Σw is the target count)."""
    elapsed = time.perf_counter() - clock.started
    return {
        "step": done,
        "epoch": round(data.epoch + (data.step_in_epoch + 1) / plan.steps_in_epoch(data.epoch), 4),
        "loss": float(sums[0]) / counts.normaliser,
        "ce": float(sums[1]) / counts.normaliser,
        "divergence": float(sums[2]) / counts.normaliser,
        **({"feature": float(sums[3]) / counts.normaliser} if float(sums[3]) else {}),  # --feature-loss: W·mean
        "lr": lr,
        "grad_norm": norm_value(grad_norm),
        "step_seconds": time.perf_counter() - clock.step_start,
        "tokens_per_second": clock.tokens_seen / elapsed,
        "padding": 1.0 - counts.real_tokens / counts.padded_tokens,
        "data_wait_share": loader.stats.wait_seconds / elapsed,
        **(loader.align.stats.metrics() if loader.align is not None else {}),  # cross-tokenizer coverage
    }


def evaluate(run: Run, learner: Learner, logger: MetricsLogger, step: int) -> dict[str, float]:
    """Held-out metrics at `step` (every rank takes part: under FSDP2 the head is gathered)."""
    seqs = run.eval_reader.iter_sequences()
    if run.eval_aligner is not None:  # another tokenizer: re-tokenized and aligned a batch at a time
        seqs = run.eval_aligner.stream(seqs, run.cfg.batch_size)
    with gathered(learner.module):
        metrics = evaluate_sequences(
            learner.module.student,
            seqs,
            run.cfg.batch_size,
            run.cfg.chunk_size,
            run.device,
            run.amp,
            teacher_head=run.eval_head,
        )
    if run.eval_aligner is not None:
        metrics.update(run.eval_aligner.stats.metrics())  # coverage of the held-out targets
    prefixed = {f"eval_{k}": v for k, v in metrics.items()}
    logger.log({"step": step, **prefixed}, console=False)
    return prefixed


def finish(
    run: Run,
    learner: Learner,
    plan: EpochPlan,
    position: Position,
    logger: MetricsLogger,
    last_metrics: dict[str, Any],
    clock: Clock,
    loader: StepLoader,
) -> dict[str, Any]:
    """The last checkpoint, the student in Hugging Face format, and the run's summary."""
    cfg, env, module = run.cfg, run.env, learner.module
    final_state = save(run.out, position.total_steps, module, learner.optimizer, cfg, env, learner.fsdp, plan, position)
    if env.is_main:
        student = plain_copy(unwrap_causal_lm(module.student), final_state) if learner.fsdp else module.student
        save_student(student, run.tokenizer, run.out, cfg, last_metrics, run.layers)
    logger.close()
    if env.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {
        "out": str(run.out),
        "steps": position.total_steps,
        "trainable_parameters": run.trainable,
        "seconds_to_first_step": clock.first_step_seconds,
        "data_wait_seconds": loader.stats.wait_seconds,
        **last_metrics,
    }


def save_student(student, tokenizer, out: Path, cfg: TrainConfig, metrics: dict[str, Any], layers) -> None:
    """Write the student as a Hugging Face directory (safetensors, tokenizer, chat template)."""
    model = student
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = unwrap_causal_lm(model)
    if cfg.save_dtype != "auto":
        # In place: training is over, and a cast copy would untie the embeddings from the head (two
        # tensors on disk where the model shares one). save_pretrained records the dtype in config.json.
        model.to(resolve_dtype(cfg.save_dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    summary = {"config": asdict(cfg), "layers_from_teacher": layers, "final_metrics": metrics}
    (out / "kd_training.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
