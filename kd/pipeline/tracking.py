"""Metrics to the console, a JSONL file, and optionally TensorBoard or Weights & Biases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kd.errors import KdError
from kd.pipeline.progress import log

REPORT_TARGETS = ("none", "tensorboard", "wandb")


class MetricsLogger:
    """Writes one JSON object per logged step to ``metrics.jsonl``; mirrors to TensorBoard/wandb."""

    def __init__(
        self,
        out: Path,
        report_to: str = "none",
        run_config: dict[str, Any] | None = None,
        resume_step: int | None = None,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            # Drop entries logged after the checkpoint we resume from: they will be redone.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if report_to not in REPORT_TARGETS:
            raise KdError(f"--report-to {report_to}: expected one of {', '.join(REPORT_TARGETS)}")
        if report_to == "tensorboard":
            self._tb = _tensorboard_writer(out)
        elif report_to == "wandb":
            self._wandb = _import_wandb().init(project="kd", config=run_config or {}, dir=str(out))

    def log(self, metrics: dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        step = metrics.get("step", 0)
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if console:
            log("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def report_scalars(out: Path, report_to: str, metrics: dict[str, Any], step: int, prefix: str = "") -> None:
    """Mirror one record of scalars to TensorBoard (OUT/tensorboard) or wandb, opening and closing
    the writer around it.

    For callers that report rarely and share the process with other loggers: `kd on-policy` reports
    one record per round while every round's trainer opens and finishes a run of its own, so a
    writer held open across rounds would be finished under it. wandb resumes one run per OUT (its
    id kept in OUT/wandb-run-id), so all rounds land on one chart.
    """
    if report_to == "none":
        return
    if report_to not in REPORT_TARGETS:
        raise KdError(f"--report-to {report_to}: expected one of {', '.join(REPORT_TARGETS)}")
    numeric = {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if report_to == "tensorboard":
        writer = _tensorboard_writer(out)
        try:
            for key, value in numeric.items():
                writer.add_scalar(key, value, step)
        finally:
            writer.close()
        return
    wandb = _import_wandb()
    id_file = out / "wandb-run-id"
    if not id_file.is_file():
        id_file.write_text(wandb.util.generate_id() + "\n")
    run = wandb.init(project="kd", id=id_file.read_text().strip(), resume="allow", dir=str(out))
    try:
        run.log(numeric, step=step)
    finally:
        run.finish()


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise KdError("--report-to tensorboard needs `pip install tensorboard`") from exc
    return SummaryWriter(str(out / "tensorboard"))


def _import_wandb():
    try:
        import wandb
    except ImportError as exc:
        raise KdError("--report-to wandb needs `pip install wandb`") from exc
    return wandb
