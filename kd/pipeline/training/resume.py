"""Where a run starts and what it saves: --init-from, --resume, and the checkpoints that make them exact.

The resume contract: a run killed at any point and rerun with --resume ends with the same weights,
losses and metrics as an uninterrupted one. A checkpoint holds the student's weights, AdamW's state,
the step, every rank's RNG state, a fingerprint of the settings that must not change (all but
bookkeeping flags), the schedule length, and the data position (which plan, and where in it). A
resume with other settings, another schedule or another data layout is refused in one line; the
data order is a pure function of seed, epoch and step, so the stream continues where it stopped.

Steps are counted globally: a run that starts --init-from a checkpoint at step B trains steps
[B, B + run_steps); its data plan is indexed from B. The learning-rate schedule spans
--schedule-steps, or else the last step of the run (B + run_steps).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from kd.errors import KdError
from kd.pipeline.progress import log
from kd.pipeline.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kd.pipeline.training.config import TrainConfig
from kd.pipeline.training.distributed import DistEnv, gather_from_ranks
from kd.pipeline.training.order import EpochPlan
from kd.pipeline.training.sharding import full_model_state, full_optimizer_state, load_full_state

BOOKKEEPING = {
    "resume",
    "save_every",
    "keep_checkpoints",
    "eval_every",
    "log_every",
    "report_to",
    "max_steps",  # may change; the schedule length it implies is checked on its own (see `resume_from`)
    "extra",
    "prefetch",
}
"""Settings that may change across --resume."""


@dataclass
class Position:
    """Where this run's steps lie: [start_step, total_steps), the plan indexed from base_step."""

    base_step: int
    start_step: int
    total_steps: int
    schedule_steps: int


def config_fingerprint(cfg: TrainConfig) -> str:
    """Settings that must not change across --resume (everything but bookkeeping flags)."""
    relevant = {k: v for k, v in asdict(cfg).items() if k not in BOOKKEEPING}
    return json.dumps(relevant, sort_keys=True)


def same_settings(saved_fingerprint: str, cfg: TrainConfig) -> bool:
    """Whether a checkpoint's settings are this run's. A setting the checkpoint lacks was added to kd
    after it was written; that run used what is now the setting's default, so a rerun with the default
    is the same run and resumes (a kd upgrade mid-run keeps its finished steps)."""
    if saved_fingerprint == config_fingerprint(cfg):
        return True
    saved = json.loads(saved_fingerprint)
    current = json.loads(config_fingerprint(cfg))
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    added = {k for k in current.keys() - saved.keys() if k in defaults and current[k] == defaults[k]}
    return saved == {k: v for k, v in current.items() if k not in added}


def rng_for_rank(state: dict[str, Any], env: DistEnv) -> dict[str, Any]:
    """This rank's RNG state from a checkpoint: its own when the checkpoint has one per rank of the same
    world size, else rank 0's (a checkpoint from another world size, or from before per-rank states)."""
    per_rank = state.get("rng_per_rank")
    if per_rank is not None and len(per_rank) == env.world_size:
        return per_rank[env.rank]
    return state["rng"]


def restore(cfg: TrainConfig, out: Path, module, optimizer, fsdp: bool, plan: EpochPlan, env: DistEnv, run_steps: int):
    """Load --init-from, then --resume's newest checkpoint, into the student and optimizer."""
    base_step = 0
    if cfg.init_from:
        source = Path(cfg.init_from)
        if not (source / "state.pt").is_file():
            source = latest_checkpoint(source) or source
        state = load_checkpoint(source)
        if ("features" in state) != (module.features is not None):  # AdamW's state covers other parameters
            had = "with" if "features" in state else "without"
            raise KdError(
                f"--init-from {cfg.init_from}: the checkpoint was trained {had} --feature-loss, this run "
                f"{'is not' if had == 'with' else 'is'}; give both runs the same --feature-loss and --feature-map"
            )
        load_full_state(module, module.student, optimizer, state, fsdp)
        load_feature_state(module, state, source)
        set_rng_state(rng_for_rank(state, env))
        base_step = int(state["step"])
    total_steps = base_step + run_steps
    position = Position(base_step, base_step, total_steps, cfg.schedule_steps or total_steps)
    if cfg.resume:
        position.start_step = resume_from(cfg, out, module, optimizer, fsdp, plan, env, position)
    return position


def resume_from(
    cfg: TrainConfig, out: Path, module, optimizer, fsdp: bool, plan: EpochPlan, env: DistEnv, position: Position
) -> int:
    """The step --resume continues from (its checkpoint loaded), or the start when there is none."""
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        log(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
        return position.start_step
    state = load_checkpoint(checkpoint)
    if not same_settings(state["config_fingerprint"], cfg):
        raise KdError(f"--resume: {checkpoint} was written with different settings; use another --out")
    if state.get("data", {}).get("plan") not in (None, plan.fingerprint()):
        raise KdError(
            f"--resume: {checkpoint} was trained on another data layout (the cache or corpus changed); "
            "use another --out"
        )
    saved_schedule = state.get("schedule_steps")  # absent in checkpoints of older kd versions
    if saved_schedule is not None and int(saved_schedule) != position.schedule_steps:
        raise KdError(
            f"--resume: {checkpoint} follows a learning-rate schedule of {int(saved_schedule)} steps, this run's "
            f"is {position.schedule_steps}; keep --max-steps as it was, or give --schedule-steps {int(saved_schedule)}"
        )
    load_full_state(module, module.student, optimizer, state, fsdp)
    load_feature_state(module, state, checkpoint)
    set_rng_state(rng_for_rank(state, env))
    log(f"resumed from {checkpoint} (step {int(state['step'])})")
    return int(state["step"])


def save(
    out: Path,
    step: int,
    module,
    optimizer,
    cfg: TrainConfig,
    env: DistEnv,
    fsdp: bool,
    plan: EpochPlan,
    position: Position,
) -> dict[str, torch.Tensor]:
    """Write a checkpoint (rank 0) and return the full student weights. Collective under torchrun."""
    model_state = full_model_state(module.student, fsdp)
    optimizer_state = full_optimizer_state(module, optimizer, fsdp)
    rng_states = gather_from_ranks(rng_state(), env)
    if env.is_main:
        save_checkpoint(
            out,
            step,
            {
                "step": step,
                "model": model_state,
                "optimizer": optimizer_state,
                # --feature-loss projections (AdamW's state of them is in "optimizer"); absent without it.
                **({"features": feature_state(module)} if module.features is not None else {}),
                "rng": rng_states[0],
                "rng_per_rank": rng_states,
                "config_fingerprint": config_fingerprint(cfg),
                "schedule_steps": position.schedule_steps,
                # The stream position: steps done in the plan (epoch, step inside it) and which plan.
                "data": {
                    "plan": plan.fingerprint(),
                    "base_step": position.base_step,
                    "position": list(plan.locate(step - position.base_step)),
                },
            },
            keep=cfg.keep_checkpoints,
        )
    if env.world_size > 1:
        torch.distributed.barrier()
    return model_state


def feature_state(module) -> dict[str, torch.Tensor]:
    """The --feature-loss projections' weights as fp32 CPU tensors (they are replicated, never sharded)."""
    return {k: v.detach().float().cpu() for k, v in module.features.state_dict().items()}


def load_feature_state(module, state: dict[str, Any], checkpoint: Path) -> None:
    """Restore the --feature-loss projections (a run with them only meets checkpoints with them: the
    config fingerprint, and --init-from's check, see to that)."""
    if module.features is None:
        return
    try:
        module.features.load_state_dict(state["features"])
    except RuntimeError as exc:
        raise KdError(f"{checkpoint}: its feature projections do not fit this --feature-map ({exc})") from exc
