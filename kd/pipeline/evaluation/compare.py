"""`kd compare`: several models scored on the same held-out sequences, each against the first (paired).

    from kd.pipeline.evaluation.compare import CompareConfig, compare_models
    result = compare_models(CompareConfig(models=["student-ce/", "student-kd/"], cache="heldout-cache/"))

Every model is scored on the same sequences (a held-out cache, or --data with the teacher run live
once), so the difference between two models is measured sequence by sequence: the baseline (the
first model) and model B are resampled together, sequence by sequence, and the 95% bootstrap
interval of B − baseline is far narrower than either model's own interval (what both models find
hard cancels). Sequences, not tokens, are the resampled unit, and each figure is a token-weighted
ratio (numerator and denominator resampled together), as in kd.pipeline.evaluation.sequences.

Verdict of each metric, from the paired interval: "better" / "worse" when it excludes 0 on the
good / bad side, "within noise" when it holds 0. `--generate N` adds answer accuracy on the first N
prompts (greedy, paired over prompts); `--samples-at 0.1,0.7,1.2` keeps every model's sampled answer
to the same prompts at each temperature, side by side in compare.md.
"""

from __future__ import annotations

import gc
import itertools
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kd.errors import KdError
from kd.pipeline.capture import default_device
from kd.pipeline.data import iter_examples, tokenize_example
from kd.pipeline.evaluation.model_eval import (
    Answer,
    attach_live_teacher,
    generate_answers,
    model_size_bytes,
    reference_prompts,
)
from kd.pipeline.evaluation.sequences import (
    BOOTSTRAP_SAMPLES,
    CI_LEVEL,
    RATIOS,
    paired_ratio_difference_ci,
    score_sequences,
)
from kd.pipeline.models import ModelSource, load_causal_lm, load_tokenizer, resolve_model, tokenizer_fingerprint
from kd.pipeline.progress import log
from kd.pipeline.training.batches import TrainSequence
from kd.settings import cli

METRICS = (
    ("ce", "held-out CE", "lower"),
    ("kl", "KL to the teacher", "lower"),
    ("top1_agreement", "top-1 agreement", "higher"),
    ("answer_accuracy", "answer accuracy", "higher"),
)
"""(key, label, which direction is better) of every compared metric, in report order."""


@dataclass
class CompareConfig:
    """Settings of `kd compare` (each field's docstring is its --help text)."""

    models: list[str] = field(default_factory=list, metadata=cli(argument=True))
    """Models to compare, the baseline first: HF dirs, .gguf files, `kd train` outputs or their
    checkpoints (OUT/checkpoints/step-N)."""
    data: str | None = None
    """Held-out corpus (any kd data format): scored with --teacher live, and the prompts of --generate."""
    cache: str | None = None
    """Held-out cache from `kd cache-logits` (the sequences, and the teacher's log-probs for KL and agreement)."""
    cross_tokenizer: bool = False
    """--cache was made by a teacher with another tokenizer than the models' (which must share one): each
    record is re-tokenized by the models' tokenizer (as `kd train --cross-tokenizer` does); KL and
    agreement on the aligned targets, CE on all, and the coverage (crosstok_*) reported."""
    teacher: str | None = None
    """Teacher run live over --data for KL and agreement (without --cache)."""
    data_format: str | None = None
    """Force the record format of --data."""
    top_k: int = 64
    """Teacher top-k used for KL with --teacher."""
    generate: int = 0
    """Also answer the first N prompts of --data greedily: answer accuracy, paired over prompts."""
    samples_at: str | None = None
    """Comma-separated temperatures (e.g. 0.1,0.7,1.2): every model's sampled answers to the same prompts,
    side by side in compare.md."""
    sample_prompts: int = 4
    """Prompts shown per temperature of --samples-at."""
    max_new_tokens: int = 256
    """Token budget per generated answer."""
    batch_size: int = 8
    """Sequences per forward (prompts per generate call)."""
    max_seq_len: int = 2048
    """Longest sequence."""
    limit: int | None = None
    """Use only the first N held-out sequences."""
    bootstrap: int = BOOTSTRAP_SAMPLES
    """Bootstrap resamples of each paired interval."""
    seed: int = 0
    """Seed of the bootstrap and of --samples-at's sampling."""
    device: str | None = None
    """cpu or cuda [default: cuda if available]."""
    out: str | None = None
    """Write compare.md and compare.json here."""

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise KdError(
                f"kd compare needs at least two models (the baseline first), got {len(self.models)}: "
                "kd compare BASELINE/ MODEL/ [MODEL/ ...] --cache HELD_OUT_CACHE"
            )
        if self.cache is None and self.data is None:
            raise KdError("give --cache HELD_OUT_CACHE or --data HELD_OUT (with --teacher T/ for KL and agreement)")
        if self.cache is not None and self.teacher is not None:
            raise KdError("--cache already holds the teacher's log-probs; drop --teacher")
        if self.cross_tokenizer and self.cache is None:
            raise KdError("--cross-tokenizer applies to --cache (a held-out cache made with another tokenizer)")
        if (self.generate or self.samples_at) and self.data is None:
            raise KdError("--generate and --samples-at need --data (prompts with reference answers)")
        if self.bootstrap < 100:
            raise KdError(f"--bootstrap {self.bootstrap}: use at least 100 resamples")
        self.temperatures()  # validate early

    def temperatures(self) -> list[float]:
        if not self.samples_at:
            return []
        try:
            values = [float(t) for t in self.samples_at.split(",") if t.strip()]
        except ValueError as exc:
            raise KdError(f"--samples-at {self.samples_at}: expected temperatures such as 0.1,0.7,1.2") from exc
        if not values or any(t < 0 for t in values):
            raise KdError(f"--samples-at {self.samples_at}: expected temperatures >= 0")
        return values


# ----------------------------------------------------------------------------- models


@dataclass
class ComparedModel:
    """A model argument resolved: where its weights and tokenizer come from."""

    spec: str
    source: ModelSource
    checkpoint: Path | None = None
    """A `kd train` checkpoint's state.pt, loaded over the run's final model."""


def resolve_compared_model(spec: str) -> ComparedModel:
    """A model as kd reads it, or a `kd train` checkpoint directory (OUT/checkpoints/step-N/state.pt)."""
    from kd.pipeline.training.checkpoint import STATE_FILE

    path = Path(spec).expanduser()
    state = path / STATE_FILE if path.is_dir() else None
    if state is not None and state.is_file():
        run = path.parent.parent
        if not (run / "config.json").is_file():
            raise KdError(
                f"{spec}: a checkpoint of a `kd train` run that has not finished ({run} holds no final model to "
                "take the architecture and tokenizer from); compare the run once it has finished"
            )
        return ComparedModel(spec, resolve_model(str(run), spec), state)
    return ComparedModel(spec, resolve_model(spec, "kd compare"))


def load_compared_model(model: ComparedModel, device: str):
    lm = load_causal_lm(model.source, dtype="float32" if device == "cpu" else "auto", device=device)
    if model.checkpoint is not None:
        from kd.pipeline.training.checkpoint import load_checkpoint

        weights = load_checkpoint(model.checkpoint)["model"]
        try:
            lm.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise KdError(f"{model.spec}: the checkpoint does not fit the run's final model ({first})") from exc
        del weights
    return lm.eval()


# ----------------------------------------------------------------------------- sequences


def _sequences(cfg: CompareConfig, tokenizer, device: str, aligned: dict | None = None) -> Iterable[TrainSequence]:
    """The held-out sequences every model is scored on (a fresh stream per call for a cache).

    With --cross-tokenizer the cache's records are aligned onto `tokenizer` a batch at a time, and the
    aligner's coverage counts are left in `aligned["aligner"]` for the caller to report.
    """
    if cfg.cache:
        from kd.cache.reader import CacheReader

        reader = CacheReader(cfg.cache, flag="--cache")
        seqs = itertools.islice(reader.iter_sequences(), cfg.limit)
        if cfg.cross_tokenizer and reader.settings["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
            from kd.pipeline.training.crosstok import aligner_for

            aligner = aligner_for(reader, tokenizer, load_tokenizer, flag="--cache")
            if aligned is not None:
                aligned["aligner"] = aligner
            return aligner.stream(seqs, cfg.batch_size)
        return seqs
    seqs = []
    for example in iter_examples(cfg.data, cfg.data_format, cfg.limit):
        tokenized = tokenize_example(example, tokenizer, cfg.max_seq_len)
        if tokenized is not None:
            seqs.append(TrainSequence(np.asarray(tokenized.input_ids), np.asarray(tokenized.loss_mask, bool)))
    if not seqs:
        raise KdError(f"--data {cfg.data}: no record with target tokens (held-out data needs answers to score)")
    if cfg.teacher:
        attach_live_teacher(seqs, cfg.teacher, cfg.top_k, cfg.batch_size, device, tokenizer, cfg.models[0])
    return seqs


def _cached_teacher_head(cfg: CompareConfig, device: str):
    """A hidden-state cache's teacher head (loaded once for every model), else None."""
    if not cfg.cache:
        return None
    from kd.cache.reader import CacheReader
    from kd.pipeline.training.hidden_teacher import load_cached_teacher_head

    return load_cached_teacher_head(CacheReader(cfg.cache, flag="--cache"), device)


def _check_tokenizers(cfg: CompareConfig, models: list[ComparedModel]) -> Any:
    """Every model must read the held-out token ids as the same tokens: the cache's tokenizer, or the baseline's."""
    tokenizers = [load_tokenizer(m.source) for m in models]
    prints = [tokenizer_fingerprint(t) for t in tokenizers]
    if cfg.cache:
        from kd.cache.reader import CacheReader

        expected = CacheReader(cfg.cache, flag="--cache").settings["tokenizer_fingerprint"]
        if cfg.cross_tokenizer:
            expected = prints[0]  # every model reads the cache's text re-tokenized one way
        for model, fingerprint in zip(models, prints, strict=True):
            if fingerprint != expected and cfg.cross_tokenizer:
                raise KdError(
                    f"{model.spec}: uses another tokenizer than the baseline {models[0].spec}; --cross-tokenizer "
                    "pairs models that share one tokenizer (the cache's may differ)"
                )
            if fingerprint != expected:
                raise KdError(
                    f"{model.spec}: uses another tokenizer than --cache {cfg.cache} was made with; "
                    "paired per-token figures need one tokenization (a cache made with this model's tokenizer, "
                    "or --cross-tokenizer to score it on the targets the two tokenizations share)"
                )
    else:
        for model, fingerprint in zip(models[1:], prints[1:], strict=True):
            if fingerprint != prints[0]:
                raise KdError(
                    f"{model.spec}: uses another tokenizer than the baseline {models[0].spec}; paired per-token "
                    "figures need one tokenization (compare models that share a tokenizer, or a --cache that fits)"
                )
    return tokenizers


# ----------------------------------------------------------------------------- the comparison


def verdict(interval: list[float] | None, better: str) -> str:
    """better / worse / within noise, for a paired difference (model − baseline) and its 95% interval."""
    if interval is None:
        return "within noise"
    if interval[0] > 0:
        return "better" if better == "higher" else "worse"
    if interval[1] < 0:
        return "better" if better == "lower" else "worse"
    return "within noise"


def paired_metric(
    baseline: tuple[np.ndarray, np.ndarray], model: tuple[np.ndarray, np.ndarray], better: str, samples: int, seed: int
) -> dict[str, Any]:
    """One metric of one model against the baseline: both values, the paired difference, its interval, the verdict."""
    difference, interval = paired_ratio_difference_ci(*model, *baseline, samples=samples, seed=seed)
    value = float(model[0].sum() / max(model[1].sum(), 1e-300))
    base = float(baseline[0].sum() / max(baseline[1].sum(), 1e-300))
    return {
        "baseline": base,
        "value": value,
        "difference": difference,
        "difference_ci": interval,
        "better": better,
        "verdict": verdict(interval, better),
    }


@dataclass
class Scores:
    """Every model's figures on the same held-out sequences and prompts, kept per sequence for pairing."""

    specs: list[str]
    rows: list[dict[str, Any]]
    """Each model's own metrics (evaluate_sequences' figures, answer accuracy, size)."""
    per_sequence: list[dict[str, np.ndarray]]
    """Each model's per-sequence sums (kd.pipeline.evaluation.sequences.PER_SEQUENCE), rows aligned."""
    answers: list[list[Answer]]
    """Each model's greedy answers to the --generate prompts (empty without --generate)."""
    samples: list[dict[float, list[Answer]]]
    """Each model's sampled answers to the --samples-at prompts, by temperature."""
    prompts: list[tuple[str, str]]

    def pair(self, key: str, model: int, baseline: int = 0) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """[baseline, model] (numerator, denominator) per row of metric `key`; None where it was not measured."""
        if key == "answer_accuracy":
            if not self.answers:
                return None
            ones = np.ones(len(self.answers[baseline]))
            return [(np.array([a.correct for a in self.answers[i]], float), ones) for i in (baseline, model)]
        if key not in self.rows[baseline]:
            return None
        num, den = RATIOS[key]
        return [(self.per_sequence[i][num], self.per_sequence[i][den]) for i in (baseline, model)]

    def against(self, model: int, baseline: int = 0, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict:
        """Every measured metric of `model` against `baseline`: values, paired difference, interval, verdict."""
        compared = {}
        for key, _, better in METRICS:
            if (pair := self.pair(key, model, baseline)) is not None:
                compared[key] = paired_metric(*pair, better, samples, seed)
        return {"model": self.specs[model], "baseline": self.specs[baseline], "metrics": compared}


def score_models(cfg: CompareConfig) -> Scores:
    """Score every model of `cfg` on the same held-out sequences (and prompts), one model in memory at a time."""
    device = cfg.device or default_device()
    models = [resolve_compared_model(spec) for spec in cfg.models]
    tokenizers = _check_tokenizers(cfg, models)
    wanted = max(cfg.generate, cfg.sample_prompts if cfg.samples_at else 0)
    prompts = reference_prompts(cfg.data, wanted) if wanted else []
    fixed = _sequences(cfg, tokenizers[0], device) if not cfg.cache else None
    teacher_head = _cached_teacher_head(cfg, device)
    scores = Scores([m.spec for m in models], [], [], [], [], prompts)
    for model, tokenizer in zip(models, tokenizers, strict=True):
        log(f"[bold]scoring {model.spec}[/bold]")
        lm = load_compared_model(model, device)
        aligned: dict[str, Any] = {}
        seqs = fixed if fixed is not None else _sequences(cfg, tokenizer, device, aligned)
        metrics, seq = score_sequences(lm, seqs, cfg.batch_size, device=device, teacher_head=teacher_head)
        if not metrics["tokens"]:
            raise KdError(f"{cfg.cache or cfg.data}: no target tokens to score")
        row: dict[str, Any] = {
            "model": model.spec,
            "parameters": sum(p.numel() for p in lm.parameters()),
            "size_bytes": model.checkpoint.stat().st_size if model.checkpoint else model_size_bytes(model.source),
            **metrics,
            **(aligned["aligner"].stats.metrics() if "aligner" in aligned else {}),
        }
        if cfg.generate:
            started = time.perf_counter()
            greedy = generate_answers(
                lm, tokenizer, prompts[: cfg.generate], cfg.max_new_tokens, cfg.batch_size, device
            )
            row["answer_accuracy"] = sum(a.correct for a in greedy) / len(greedy)
            row["answered"] = len(greedy)
            row["generation_tokens_per_second"] = sum(a.tokens for a in greedy) / (time.perf_counter() - started)
            scores.answers.append(greedy)
        shown = prompts[: cfg.sample_prompts]
        scores.samples.append(
            {
                t: generate_answers(lm, tokenizer, shown, cfg.max_new_tokens, cfg.batch_size, device, t, cfg.seed)
                for t in cfg.temperatures()
            }
        )
        scores.rows.append(row)
        scores.per_sequence.append(seq)
        del lm
        gc.collect()
    first = scores.per_sequence[0]["tokens"]
    if any(len(s["tokens"]) != len(first) or not np.array_equal(s["tokens"], first) for s in scores.per_sequence):
        raise KdError("the models were not scored on the same target tokens (the held-out data changed mid-run?)")
    return scores


def gap_closed_ci(
    baseline: tuple[np.ndarray, np.ndarray],
    model: tuple[np.ndarray, np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> tuple[float | None, list[float] | None]:
    """Share of the baseline → reference gap the model closes, (b − m) / (b − r) of a token-weighted metric
    (e.g. held-out KL: b CE-only, r online KD), with a 95% bootstrap interval resampling the same sequences
    for all three. Each argument is (numerator[S], denominator[S]). (None, None) when b = r."""
    arrays = [(np.asarray(n, float), np.asarray(d, float)) for n, d in (baseline, model, reference)]
    (nb, db), (nm, dm), (nr, dr) = arrays

    def ratio(n: np.ndarray, d: np.ndarray) -> np.ndarray:
        return n.sum(-1) / np.maximum(d.sum(-1), 1e-300)

    b, m, r = ratio(nb, db), ratio(nm, dm), ratio(nr, dr)
    if b == r:
        return None, None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(nb), size=(samples, len(nb)))
    gaps = (ratio(nb[idx], db[idx]) - ratio(nm[idx], dm[idx])) / (ratio(nb[idx], db[idx]) - ratio(nr[idx], dr[idx]))
    tail = (1 - CI_LEVEL) / 2 * 100
    return float((b - m) / (b - r)), [float(np.percentile(gaps, tail)), float(np.percentile(gaps, 100 - tail))]


def compare_models(cfg: CompareConfig) -> dict[str, Any]:
    """Score every model on the same held-out sequences (and prompts); compare each with the first."""
    scores = score_models(cfg)
    rows = scores.rows
    result: dict[str, Any] = {
        "baseline": scores.specs[0],
        "held_out": {
            "cache": cfg.cache,
            "data": cfg.data,
            "teacher": cfg.teacher,
            "sequences": rows[0]["sequences"],
            "tokens": rows[0]["tokens"],
            "prompts": len(scores.answers[0]) if scores.answers else 0,
        },
        "interval": {"level": CI_LEVEL, "bootstrap": cfg.bootstrap, "unit": "sequence", "paired": True},
        "models": rows,
        "comparisons": [scores.against(i, 0, cfg.bootstrap, cfg.seed) for i in range(1, len(scores.specs))],
    }
    if cfg.temperatures():
        result["samples"] = [
            {
                "temperature": t,
                "prompts": [
                    {
                        "question": question,
                        "reference": reference,
                        "answers": [
                            {"model": spec, **asdict(by_temperature[t][i])}
                            for spec, by_temperature in zip(scores.specs, scores.samples, strict=True)
                        ],
                    }
                    for i, (question, reference) in enumerate(scores.prompts[: cfg.sample_prompts])
                ],
            }
            for t in cfg.temperatures()
        ]
    if cfg.out:
        write_outputs(Path(cfg.out), result)
    return result


# ----------------------------------------------------------------------------- outputs


def _num(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _interval(ci: list[float] | None, digits: int = 3) -> str:
    return "–" if ci is None else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def comparison_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str, str, str]]:
    """(model, metric, baseline, value, difference, 95% interval, verdict) for every compared metric."""
    labels = {key: label for key, label, _ in METRICS}
    out = []
    for comparison in result["comparisons"]:
        for key, m in comparison["metrics"].items():
            out.append(
                (
                    comparison["model"],
                    labels[key],
                    _num(m["baseline"]),
                    _num(m["value"]),
                    f"{m['difference']:+.3f}",
                    _interval(m["difference_ci"]),
                    m["verdict"],
                )
            )
    return out


def markdown(result: dict[str, Any]) -> str:
    held = result["held_out"]
    source = (
        f"`{held['cache']}`"
        if held["cache"]
        else f"`{held['data']}`" + (f" (teacher `{held['teacher']}` run live)" if held["teacher"] else "")
    )
    answered = f", {held['prompts']} prompts answered greedily" if held["prompts"] else ""
    lines = [
        "# kd compare",
        "",
        f"Baseline: `{result['baseline']}`. Held-out: {source}, {held['sequences']:,} sequences, "
        f"{held['tokens']:,} target tokens{answered}.",
        "",
        "Each difference is model − baseline on the same sequences, with a 95% paired bootstrap interval "
        f"({result['interval']['bootstrap']} resamples of whole sequences, or prompts for answer accuracy). "
        "Verdict: better / worse when the interval excludes 0, within noise when it holds 0.",
        "",
        "| model | metric | baseline | model | difference | 95% interval | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in comparison_rows(result):
        cells = list(row)
        cells[0] = f"`{cells[0]}`"
        if cells[-1] != "within noise":
            cells[-1] = f"**{cells[-1]}**"
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Each model",
        "",
        "| model | params | CE | KL to teacher | top-1 agreement | answer accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["models"]:
        lines.append(
            f"| `{row['model']}` | {row['parameters']:,} | {_num(row.get('ce'))} | {_num(row.get('kl'))} "
            f"| {_num(row.get('top1_agreement'))} | {_num(row.get('answer_accuracy'))} |"
        )
    for block in result.get("samples", []):
        lines += ["", f"## Samples at temperature {block['temperature']:g}", ""]
        for number, prompt in enumerate(block["prompts"], 1):
            lines += [f"### Prompt {number}", "", f"> {prompt['question']}", "", f"Reference: `{prompt['reference']}`"]
            lines.append("")
            for answer in prompt["answers"]:
                mark = "✓ correct" if answer["correct"] else "✗ no answer" if answer["answer"] is None else "✗ wrong"
                cut = ", cut at --max-new-tokens" if answer["truncated"] else ""
                lines += [
                    f"**`{answer['model']}`** — {mark} (answer `{answer['answer']}`), {answer['tokens']} tokens{cut}",
                    "",
                    "```text",
                    answer["text"].replace("```", "ˋˋˋ"),
                    "```",
                    "",
                ]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, result: dict[str, Any]) -> None:
    from kd.cache.manifest import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "compare.md", markdown(result))
