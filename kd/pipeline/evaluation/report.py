"""report.md and its plots for `kd demo`, built only from the files the run wrote.

Every number in the report is read from a metrics file of the run (eval-*.json, metrics.jsonl,
traces.summary.json, the cache manifests), so the report cannot disagree with what was measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MODELS = ("teacher", "KD student", "CE-only student")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot(out: Path, curves: dict[str, list[dict[str, Any]]], evals: dict[str, dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in curves.items():
        train = [r for r in rows if "ce" in r]
        axes[0].plot([r["step"] for r in train], [r["ce"] for r in train], label=f"{label}: train CE")
        if any(r["divergence"] for r in train):
            axes[0].plot([r["step"] for r in train], [r["divergence"] for r in train], "--", label=f"{label}: train KL")
        ev = [r for r in rows if "eval_kl" in r]
        axes[1].plot([r["step"] for r in ev], [r["eval_kl"] for r in ev], marker="o", label=f"{label}: held-out KL")
        axes[1].plot(
            [r["step"] for r in ev], [r["eval_ce"] for r in ev], marker="x", ls=":", label=f"{label}: held-out CE"
        )
    axes[0].set(title="training loss", xlabel="step", ylabel="nats/token")
    axes[1].set(title="held-out metrics", xlabel="step", ylabel="nats/token")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    files.append("curves.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(evals)
    width = 0.38
    xs = range(len(names))
    accuracy = [evals[n].get("answer_accuracy", 0.0) for n in names]
    agreement = [evals[n].get("top1_agreement", 0.0) for n in names]
    ax.bar([x - width / 2 for x in xs], accuracy, width, label="answer accuracy")
    ax.bar([x + width / 2 for x in xs], agreement, width, label="top-1 agreement with teacher")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("held-out problems")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    files.append("accuracy.png")
    return files


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def wilson_interval(share: float, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a proportion observed `share` over `n` trials (answer accuracy)."""
    if not n:
        return None
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def interval(evaluation: dict[str, Any], key: str) -> list[float] | None:
    """The 95% interval of a metric: bootstrap over sequences from kd eval, Wilson for answer accuracy."""
    if key == "answer_accuracy" and key in evaluation:
        return wilson_interval(evaluation[key], int(evaluation.get("answered", 0)))
    return evaluation.get(f"{key}_ci")


def compare(a: list[float] | None, b: list[float] | None, better: str) -> str:
    """better / worse / within noise for A against B, from their 95% intervals (no overlap = a difference)."""
    if a is None or b is None:
        return "within noise (too few held-out sequences for an interval)"
    if a[1] < b[0]:
        return "**KD better**" if better == "lower" else "**CE-only better**"
    if a[0] > b[1]:
        return "**KD better**" if better == "higher" else "**CE-only better**"
    return "within noise (the 95% intervals overlap)"


def _with_ci(evaluation: dict[str, Any], key: str) -> str:
    value, ci = evaluation.get(key), interval(evaluation, key)
    return _fmt(value) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def paired_verdicts(comparison: dict[str, Any]) -> list[str]:
    """The demo's "Did distillation help?" lines from `kd compare student-ce student-kd` (KD − CE-only, paired)."""
    from kd.pipeline.evaluation.compare import METRICS

    lines = []
    for key, label, better in METRICS:
        m = comparison["comparisons"][0]["metrics"].get(key)
        if m is None:
            continue
        ci = m["difference_ci"]
        interval_text = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else " (too few held-out sequences for an interval)"
        verdict = {"better": "**KD better**", "worse": "**CE-only better**"}.get(m["verdict"], "within noise")
        lines.append(
            f"- {label} ({better} is better): KD {_fmt(m['value'])} vs CE-only {_fmt(m['baseline'])}, "
            f"difference {m['difference']:+.3f}{interval_text} → {verdict}"
        )
    return lines


def write_report(out: Path, cfg, steps, timings: dict[str, float]) -> Path:
    comparison = json.loads((out / "compare" / "compare.json").read_text())
    rows = {row["model"]: row for row in comparison["models"]}
    evals = {
        "teacher": json.loads((out / "eval-teacher.json").read_text()),
        "KD student": rows["student-kd"],
        "CE-only student": rows["student-ce"],
    }
    curves = {
        "KD": read_jsonl(out / "student-kd" / "metrics.jsonl"),
        "CE-only": read_jsonl(out / "student-ce" / "metrics.jsonl"),
    }
    traces = json.loads((out / "traces.summary.json").read_text())
    manifest = json.loads((out / "cache-train" / "manifest.json").read_text())
    shards = manifest["shards"]
    cache_bytes = sum(s["bytes"] for s in shards)
    cache_targets = sum(s["targets"] for s in shards)
    plots = _plot(out, curves, evals)

    verdicts = paired_verdicts(comparison)
    held = comparison["held_out"]
    if all("within noise" in line for line in verdicts):
        summary = (
            "**No: at these settings the paired intervals cannot tell the KD student from the CE-only one** "
            "on any measure below (every interval holds 0). A larger budget (`--train-problems`, `--epochs`) "
            'or more held-out problems (`--eval-problems`) narrows them; see README, "What `make demo` does".'
        )
    else:
        summary = (
            "Each line is KD − CE-only on the same held-out sequences, with a 95% paired bootstrap interval "
            "(sequences, or problems for answer accuracy, resampled together for both students); a verdict "
            'other than "within noise" means the interval excludes 0.'
        )
    lines = [
        "# kd demo report",
        "",
        f"Teacher: `{cfg.teacher or 'smollm2-135m-instruct'}` (embedded SmolLM2-135M-Instruct unless set). "
        f"Students: {cfg.layers} of the teacher's layers, trained for {cfg.epochs} epochs each on the same "
        f"cache, data order and learning rate; the KD student uses alpha={cfg.alpha}, T={cfg.temperature}; "
        "the baseline uses CE only (alpha=1).",
        "",
        "## Did distillation help?",
        "",
        summary,
        "",
        *verdicts,
        "",
        f"From `kd compare student-ce student-kd` over {held['sequences']} held-out solutions "
        f"({held['tokens']:,} target tokens) and {held['prompts']} held-out problems answered greedily; "
        "`compare/compare.md` has the full table and both students' answers side by side at temperatures "
        "0.1, 0.7 and 1.2.",
        "",
        "## Held-out results",
        "",
        "| model | params | size on disk (MB) | CE | KL to teacher | top-1 agreement | ECE | answer accuracy | "
        "gen tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        e = evals[name]
        lines.append(
            f"| {name} | {_fmt(e['parameters'])} | {e['size_bytes'] / 1e6:.1f} | {_with_ci(e, 'ce')} "
            f"| {_with_ci(e, 'kl')} | {_with_ci(e, 'top1_agreement')} | {_fmt(e['ece'])} "
            f"| {_with_ci(e, 'answer_accuracy')} "
            f"({e.get('answered', 0)} problems) | {_fmt(e.get('generation_tokens_per_second'), 1)} |"
        )
    lines += [
        "",
        "CE, KL and agreement are per token over the reference solutions of the held-out problems "
        "(`cache-heldout`); answer accuracy is greedy generation checked against the known answer. "
        "Brackets hold each model's own 95% interval (a bootstrap over held-out sequences for the token "
        "metrics, a Wilson interval for answer accuracy); the verdicts above rest on the narrower paired "
        "intervals of the differences, since both students are scored on the same sequences. "
        "Size on disk is the weight files as stored: a quantised GGUF teacher (the embedded one is 4-bit "
        "Q4_1) takes fewer bytes per parameter than the students, which are saved as bfloat16 safetensors "
        "(`kd train --save-dtype bfloat16`: trained in float32 on a CPU, evaluated in float32 again).",
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
        "## Data",
        "",
        f"- traces: {_fmt(traces.get('samples'))} samples from {_fmt(traces.get('prompts'))} prompts; verified "
        f"correct share {_fmt(traces.get('correct_share', traces.get('accepted_share')))}; kept "
        f"{_fmt(traces.get('accepted'))} ({_filter_note(cfg.filter)})",
        f"- cache: {len(shards)} shard(s), {cache_targets:,} target tokens, {cache_bytes:,} bytes "
        f"({cache_bytes / max(cache_targets, 1):.1f} B/token, top-{cfg.top_k} + tail, "
        f"{manifest['settings'].get('value_encoding')} values)",
        "",
        "## Steps and commands",
        "",
        f"Run from `{out}`; each command can be rerun on its own.",
        "",
        "| step | seconds | command |",
        "|---|---|---|",
    ]
    for step in steps:
        seconds = timings.get(step.name)
        lines.append(f"| {step.name} | {_fmt(seconds, 1) if seconds is not None else 'reused'} | `{step.display()}` |")
    lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _filter_note(name: str) -> str:
    """What the kept traces are, and why: a newcomer reads a low correct share as a broken demo."""
    if name == "correct":
        return "filter: verified-correct, non-truncated, de-duplicated"
    return (
        "filter: all non-truncated, de-duplicated: the students learn to imitate the teacher, its wrong "
        "answers included; a small teacher is right on few of these problems, and with a stronger "
        "`--teacher` `--filter correct` keeps only its verified answers"
    )
