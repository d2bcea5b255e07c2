"""The whole distillation on one machine, step by step, each step a real `kd` command.

The demo writes its own prompts (arithmetic word problems with known answers), samples reasoning
traces from the teacher, caches the teacher's logits over them, trains two students of the same
size on the same budget (cached KD and a CE-only baseline), evaluates the teacher and both students
on held-out problems, and writes report.md with plots. Every step is a subprocess running the
command printed in the report, so any step can be rerun by hand; a step whose output is complete is
reused on the next run.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kd.errors import KdError
from kd.pipeline.progress import log


@dataclass
class DemoConfig:
    """Knobs of `kd demo`, sized so the whole run fits in 15 minutes on an idle 2-core CPU (see README)."""

    out: str = "demo-out"
    """Where every artefact and report.md go."""
    teacher: str | None = None
    """Teacher model [default: the embedded SmolLM2-135M-Instruct]."""
    train_problems: int = 32
    """Generated training prompts."""
    eval_problems: int = 24
    """Held-out prompts (reference solutions for token metrics; answers for accuracy)."""
    samples: int = 2
    """Teacher traces per training prompt."""
    max_new_tokens: int = 160
    """Token budget per trace / per answer."""
    layers: str = "even:8"
    """Teacher layers the students are cut from."""
    top_k: int = 64
    """Cached top-k."""
    epochs: float = 2.0
    """Training budget of each student (same for both). One epoch (9 steps) left the KD student behind
    the CE-only one on top-1 agreement; two made KD better on CE, KL and agreement for ~85 s more."""
    batch_size: int = 4
    """Training batch size."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    alpha: float = 0.0
    """CE weight of the KD student (the baseline is CE only: alpha = 1)."""
    temperature: float = 1.0
    """Distillation temperature."""
    dtype: str = "auto"
    """Students' training dtype: auto is bf16 autocast on CUDA and fp32 on CPU (CPUs without bf16
    matrix units run bf16 training many times slower: measured 60 s vs 2.3 s for the head + loss)."""
    engine: str = "auto"
    """gen-traces engine: auto (vllm if installed, else transformers)."""
    filter: str = "all"
    """Which teacher traces the students learn from (gen-traces' --filter): all finished ones, or only
    verified-correct ones. The embedded 135M teacher is right on a few percent of these problems, so
    `correct` would leave almost nothing: the demo distils the teacher as it is, mistakes included.
    With a stronger --teacher, `correct` is the usual choice."""
    seed: int = 0
    """Seed of prompts, sampling and training."""
    eval_every: int = 0
    """Held-out evaluation of the students every N steps (0: every eighth of the steps planned from
    --train-problems x --samples, so the curves have several points; 10 left only two)."""

    def __post_init__(self) -> None:
        if self.filter not in ("all", "correct"):
            raise KdError(f"--filter {self.filter}: expected all or correct")

    def eval_cadence(self) -> int:
        if self.eval_every > 0:
            return self.eval_every
        steps = math.ceil(self.train_problems * self.samples / self.batch_size) * self.epochs
        return max(1, round(steps / 8))


@dataclass
class Step:
    name: str
    args: list[str]
    done_marker: str
    """Path (relative to out) that exists only once the step has fully succeeded."""
    stdout_to: str | None = None

    def display(self) -> str:
        line = "kd " + " ".join(shlex.quote(a) for a in self.args)
        return line + (f" > {self.stdout_to}" if self.stdout_to else "")


def build_steps(cfg: DemoConfig) -> list[Step]:
    teacher = ["--teacher", cfg.teacher] if cfg.teacher else []
    teacher_model = cfg.teacher or "smollm2-135m-instruct"
    student_common = [
        "--from-cache",
        "cache-train",
        "--student-from-teacher",
        "--layers",
        cfg.layers,
        "--epochs",
        str(cfg.epochs),
        "--batch-size",
        str(cfg.batch_size),
        "--learning-rate",
        str(cfg.learning_rate),
        "--warmup-steps",
        "5",
        "--seed",
        str(cfg.seed),
        "--eval-cache",
        "cache-heldout",
        "--eval-every",
        str(cfg.eval_cadence()),
        "--log-every",
        "1",
        "--temperature",
        str(cfg.temperature),
        "--dtype",
        cfg.dtype,
        "--save-dtype",  # half the bytes of a float32 student; eval upcasts on CPU
        "bfloat16",
        *teacher,
    ]
    eval_common = [
        "--cache",
        "cache-heldout",
        "--data",
        "heldout.jsonl",
        "--generate",
        str(cfg.eval_problems),
        "--max-new-tokens",
        str(cfg.max_new_tokens),
        "--json",
    ]
    engine = [] if cfg.engine == "auto" else ["--engine", cfg.engine]
    return [
        Step(
            "prompts",
            ["make-problems", "--count", str(cfg.train_problems), "--seed", str(cfg.seed), "--out", "train.jsonl"],
            "train.jsonl",
        ),
        Step(
            "held-out prompts",
            [
                "make-problems",
                "--count",
                str(cfg.eval_problems),
                "--seed",
                str(cfg.seed + 1000),
                "--out",
                "heldout.jsonl",
            ],
            "heldout.jsonl",
        ),
        Step(
            "teacher traces",
            [
                "gen-traces",
                *teacher,
                *engine,
                "--prompts",
                "train.jsonl",
                "--decontaminate",  # no training prompt shares 8 words in a row with a held-out one
                "heldout.jsonl",
                "--out",
                "traces.jsonl",
                "--n",
                str(cfg.samples),
                "--max-new-tokens",
                str(cfg.max_new_tokens),
                "--filter",
                cfg.filter,
                "--seed",
                str(cfg.seed),
                "--json",
            ],
            "traces.summary.json",
            stdout_to="traces.summary.json",
        ),
        Step(
            "teacher logits (train)",
            [
                "cache-logits",
                *teacher,
                "--data",
                "traces.jsonl",
                "--out",
                "cache-train",
                "--top-k",
                str(cfg.top_k),
                *(["--temperatures", f"1,{cfg.temperature!r}"] if cfg.temperature != 1.0 else []),
            ],  # fmt: skip
            "cache-train/manifest.json",
        ),
        Step(
            "teacher logits (held-out)",
            ["cache-logits", *teacher, "--data", "heldout.jsonl", "--out", "cache-heldout", "--top-k", str(cfg.top_k)],
            "cache-heldout/manifest.json",
        ),
        Step(
            "student: cached KD",
            ["train", *student_common, "--alpha", str(cfg.alpha), "--out", "student-kd"],
            "student-kd/kd_training.json",
        ),
        Step(
            "student: CE only",
            ["train", *student_common, "--alpha", "1.0", "--out", "student-ce"],
            "student-ce/kd_training.json",
        ),
        Step(
            "eval: teacher",
            ["eval", "--model", teacher_model, *eval_common],
            "eval-teacher.json",
            stdout_to="eval-teacher.json",
        ),
        Step(
            "compare: KD vs CE-only",
            [
                "compare",
                "student-ce",
                "student-kd",
                "--cache",
                "cache-heldout",
                "--data",
                "heldout.jsonl",
                "--generate",
                str(cfg.eval_problems),
                "--max-new-tokens",
                str(cfg.max_new_tokens),
                "--samples-at",
                "0.1,0.7,1.2",
                "--sample-prompts",
                "2",
                "--out",
                "compare",
            ],
            "compare/compare.json",
        ),
    ]


def _complete(out: Path, step: Step) -> bool:
    marker = out / step.done_marker
    if not marker.exists():
        return False
    if marker.name == "manifest.json":
        return bool(json.loads(marker.read_text()).get("complete"))
    return True


def run_step(out: Path, step: Step) -> float:
    """Run one step's command in `out`; stdout goes to a file atomically if the step wants it."""
    command = [sys.executable, "-m", "kd.cli", *step.args]
    log(f"[bold]→ {step.name}[/bold]: {step.display()}")
    started = time.perf_counter()
    stdout = subprocess.PIPE if step.stdout_to else None
    proc = subprocess.run(command, cwd=out, stdout=stdout, text=True)
    if proc.returncode != 0:
        raise KdError(
            f"demo step '{step.name}' failed (exit {proc.returncode}); rerun it with: cd {out} && "
            f"{Step(step.name, [*step.args, '--debug'], step.done_marker, step.stdout_to).display()}"
        )
    if step.stdout_to:
        from kd.cache.manifest import atomic_write_text

        atomic_write_text(out / step.stdout_to, proc.stdout)
    return time.perf_counter() - started


def _require_traces(out: Path, step: Step, cfg: DemoConfig) -> None:
    """Stop with advice (and make the step rerun) if the teacher finished no trace within the budget."""
    summary = json.loads((out / step.done_marker).read_text())
    if not summary.get("accepted"):
        (out / step.done_marker).unlink()
        if cfg.filter == "correct":
            raise KdError(
                f"the teacher answered none of its {summary.get('samples', 0)} traces correctly "
                "(--filter correct); use --filter all or a stronger --teacher"
            )
        raise KdError(
            f"the teacher finished none of its {summary.get('samples', 0)} traces within --max-new-tokens "
            f"{cfg.max_new_tokens} ({summary.get('truncated', 0)} truncated); raise --max-new-tokens"
        )


def check_settings(out: Path, cfg: DemoConfig) -> None:
    """Record the demo's settings in OUT, or refuse a rerun into OUT with other ones.

    A setting the recorded file lacks was added to kd after that demo ran; the demo used what is now
    its default, so a rerun with that default is still the same demo and resumes.
    """
    settings_file = out / "demo-settings.json"
    settings = asdict(cfg)
    defaults = asdict(DemoConfig(out=cfg.out))
    if settings_file.exists():
        recorded = json.loads(settings_file.read_text())
        if {**defaults, **recorded} != settings:
            raise KdError(f"{out} holds a demo made with other settings; pass another --out or delete it")
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")


def run_demo(cfg: DemoConfig) -> Path:
    """Run (or resume) the demo and write report.md; returns the report path."""
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, cfg)
    timings_file = out / "timings.json"
    timings: dict[str, Any] = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    steps = build_steps(cfg)
    for step in steps:
        if _complete(out, step):
            log(f"[dim]✓ {step.name}: reused ({step.done_marker} exists)[/dim]")
            continue
        timings[step.name] = run_step(out, step)
        timings_file.write_text(json.dumps(timings, indent=2) + "\n")
        if step.done_marker == "traces.summary.json":
            _require_traces(out, step, cfg)
    from kd.pipeline.evaluation.report import write_report

    return write_report(out, cfg, steps, timings)
