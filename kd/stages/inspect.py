"""`kd inspect CACHE [--verify] [--student S/] [--json]`: what a logit cache holds, and whether it is intact.

kd inspect cache/ --verify
kd inspect cache/ --student gemma-student/   # + how a student of another tokenizer is served (--cross-tokenizer)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import typer
from rich.table import Table

from kd.cache.reader import CacheReader, decode_table
from kd.cache.sizes import bytes_breakdown
from kd.cache.teacher_head import checked_head_file
from kd.errors import KdError
from kd.pipeline.progress import console


def cache_report(reader: CacheReader, verify: bool, sample_shards: int | None = None) -> dict[str, Any]:
    """Summary numbers of a cache: sizes, bytes per target token, top-k mass coverage, checksums."""
    shards = reader.shards
    settings = reader.settings
    targets = sum(s["targets"] for s in shards)
    payload = sum(s["bytes"] for s in shards)
    report: dict[str, Any] = {
        "cache": str(reader.dir),
        "complete": bool(reader.manifest.get("complete")),
        "kd_version": reader.manifest.get("kd_version"),
        "teacher": settings["teacher"],
        "tokenizer_fingerprint": settings["tokenizer_fingerprint"],
        "vocab_size": settings["vocab_size"],
        "mode": settings["mode"],
        "k": settings["k"],
        "num_samples": settings["num_samples"],
        "value_encoding": settings["value_encoding"],
        "temperatures": list(reader.temperatures) if settings["mode"] == "topk" else None,
        "hidden_encoding": settings.get("hidden_encoding"),
        "hidden_size": settings.get("hidden_size"),
        "hidden_layers": settings.get("hidden_layers"),  # --hidden-layers (feature distillation); None: none
        "teacher_head": reader.manifest.get("teacher_head"),
        "corpus": settings["corpus"],
        "world_size": settings["world_size"],
        "shards": len(shards),
        "rows": sum(s["rows"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "targets": targets,
        "bytes": payload,
        "bytes_per_target_token": payload / targets if targets else None,
        "bytes_per_target_token_by_part": bytes_breakdown(reader, sample_shards or 4) if targets else None,
    }
    # Teacher mass covered by the stored ids (top-k mode) / unique ids per token (rs mode).
    coverage, unique = [], []
    for shard in shards[: sample_shards or len(shards)] if reader.mode != "hidden" else []:
        for seq in decode_table(reader.read_table(shard, verify=False), reader.mode, reader.value_encoding):
            if reader.mode == "topk":
                coverage.append(np.exp(seq.teacher.logprobs.astype(np.float64)).sum(axis=1))
            else:
                unique.extend(len(i) for i in seq.teacher.ids)
    if coverage:
        report["topk_mass_mean"] = float(np.concatenate(coverage).mean())
    if unique:
        report["unique_ids_per_token"] = float(np.mean(unique))
    if verify:
        problems = reader.verify()
        if reader.mode == "hidden":
            try:
                checked_head_file(reader.dir, reader.manifest, "inspect")
            except KdError as exc:
                problems.append(str(exc))
        report["verified"] = not problems
        report["problems"] = problems
    return report


def student_coverage(reader: CacheReader, student: str, sample_shards: int | None = None) -> dict[str, Any]:
    """How `kd train --cross-tokenizer` serves a student with its own tokenizer: the coverage figures of its run.

    The records of the sampled shards go through the same Aligner as training (crosstok.aligner_for);
    a student with the cache's tokenizer is served as is (coverage 1).
    """
    from kd.pipeline.models import load_tokenizer, resolve_model, tokenizer_fingerprint
    from kd.pipeline.training.crosstok import aligner_for

    tokenizer = load_tokenizer(resolve_model(student, "--student"))
    out: dict[str, Any] = {"student": student, "same_tokenizer": False}
    if tokenizer_fingerprint(tokenizer) == reader.settings["tokenizer_fingerprint"]:
        return {**out, "same_tokenizer": True, "crosstok_target_coverage": 1.0, "crosstok_mass_mapped": 1.0}
    aligner = aligner_for(reader, tokenizer, load_tokenizer, flag="--student")
    for shard in reader.shards[: sample_shards or len(reader.shards)]:
        seqs = list(decode_table(reader.read_table(shard, verify=False), reader.mode, reader.value_encoding))
        for start in range(0, len(seqs), 64):
            aligner(seqs[start : start + 64])
    return {**out, "student_targets": aligner.stats.student_targets, **aligner.stats.metrics()}


def _mode_line(report: dict[str, Any]) -> str:
    if report["mode"] == "topk":
        return f"topk k={report['k']}"
    if report["mode"] == "hidden":
        layers = report.get("hidden_layers")
        extra = f"; layers {','.join(map(str, layers))} for --feature-loss" if layers else ""
        return f"hidden d={report['hidden_size']} ({report['hidden_encoding']}; exact full-vocabulary teacher{extra})"
    return f"rs samples={report['num_samples']}"


def _temperatures_line(report: dict[str, Any]) -> str:
    if report["mode"] == "hidden":
        return "any (the full distribution is recomputed)"
    return ", ".join(f"{t:g}" for t in report["temperatures"] or [1.0])


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect(
        cache: str = typer.Argument(..., help="Cache directory written by `kd cache-logits`."),
        verify: bool = typer.Option(
            False, "--verify", help="Check every shard's size and sha256 against the manifest."
        ),
        student: str | None = typer.Option(
            None,
            "--student",
            help="A student (HF dir, .gguf, config.json beside its tokenizer): report how --cross-tokenizer "
            "serves its tokenizer (share of its targets with a teacher distribution, teacher mass mapped).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Show a cache's manifest, bytes per target token and top-k mass coverage; verify checksums."""
        reader = CacheReader(cache, require_complete=False, flag="kd inspect")
        report = cache_report(reader, verify)
        if student is not None:
            report["cross_tokenizer"] = student_coverage(reader, student)
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            table = Table(title=f"kd cache {cache}", show_header=False)
            rows = [
                ("complete", report["complete"]),
                ("teacher", f"{report['teacher']['name']} ({report['teacher']['weights_fingerprint']})"),
                ("tokenizer", report["tokenizer_fingerprint"]),
                ("vocab", report["vocab_size"]),
                ("mode", _mode_line(report)),
                ("value encoding", report["value_encoding"]),
                ("temperatures (exact at)", _temperatures_line(report)),
                ("corpus", f"{report['corpus']['path']} ({report['corpus']['fingerprint']})"),
                ("ranks", report["world_size"]),
                ("shards", report["shards"]),
                ("rows / tokens / targets", f"{report['rows']:,} / {report['tokens']:,} / {report['targets']:,}"),
                ("bytes", f"{report['bytes']:,}"),
                ("bytes per target token", f"{report['bytes_per_target_token']:.1f}"),
                (
                    "  " + " / ".join(k for k, v in (report["bytes_per_target_token_by_part"] or {}).items() if v),
                    " / ".join(f"{v:.1f}" for v in (report["bytes_per_target_token_by_part"] or {}).values() if v),
                ),
            ]
            if report["teacher_head"]:
                head = report["teacher_head"]
                rows.append(
                    (
                        "teacher head (once per cache)",
                        f"{head['bytes']:,} bytes, {head['dtype']} {head['shape'][0]} x {head['shape'][1]}"
                        + (" + bias" if head["bias"] else "")
                        + "".join(f", {k} {v:g}" for k, v in head["transforms"].items() if v not in (None, 1.0)),
                    )
                )
            if "topk_mass_mean" in report:
                rows.append(("teacher mass in top-k", f"{report['topk_mass_mean']:.4f}"))
            if "unique_ids_per_token" in report:
                rows.append(("unique ids per token", f"{report['unique_ids_per_token']:.2f}"))
            if "cross_tokenizer" in report:
                cross = report["cross_tokenizer"]
                kind = "the cache's tokenizer" if cross["same_tokenizer"] else "another tokenizer: --cross-tokenizer"
                rows.append(("student", f"{cross['student']} ({kind})"))
                rows.append(("  its targets with a teacher row", f"{cross['crosstok_target_coverage']:.4f}"))
                rows.append(("  teacher mass mapped to its ids", f"{cross['crosstok_mass_mapped']:.4f}"))
                if "crosstok_records_not_round_tripped" in cross:
                    rows.append(("  records not round-tripped", f"{cross['crosstok_records_not_round_tripped']:.4f}"))
            if verify:
                rows.append(("checksums", "ok" if report["verified"] else f"{len(report['problems'])} problem(s)"))
            for key, value in rows:
                table.add_row(key, str(value))
            console.print(table)
        if verify and not report["verified"]:
            raise KdError("; ".join(report["problems"]))
