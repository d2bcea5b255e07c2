"""`kd inspect CACHE [--verify] [--json]`: what a logit cache holds, and whether it is intact.

kd inspect cache/ --verify
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import typer
from rich.table import Table

from kd.cache.reader import CacheReader, decode_table
from kd.cache.sizes import bytes_breakdown
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
    for shard in shards[: sample_shards or len(shards)]:
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
        report["verified"] = not problems
        report["problems"] = problems
    return report


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect(
        cache: str = typer.Argument(..., help="Cache directory written by `kd cache-logits`."),
        verify: bool = typer.Option(
            False, "--verify", help="Check every shard's size and sha256 against the manifest."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Show a cache's manifest, bytes per target token and top-k mass coverage; verify checksums."""
        reader = CacheReader(cache, require_complete=False, flag="kd inspect")
        report = cache_report(reader, verify)
        if as_json:
            typer.echo(json.dumps(report, indent=2))
        else:
            table = Table(title=f"kd cache {cache}", show_header=False)
            rows = [
                ("complete", report["complete"]),
                ("teacher", f"{report['teacher']['name']} ({report['teacher']['weights_fingerprint']})"),
                ("tokenizer", report["tokenizer_fingerprint"]),
                ("vocab", report["vocab_size"]),
                (
                    "mode",
                    f"{report['mode']} k={report['k']}"
                    if report["mode"] == "topk"
                    else f"rs samples={report['num_samples']}",
                ),
                ("value encoding", report["value_encoding"]),
                ("temperatures (exact at)", ", ".join(f"{t:g}" for t in report["temperatures"] or [1.0])),
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
            if "topk_mass_mean" in report:
                rows.append(("teacher mass in top-k", f"{report['topk_mass_mean']:.4f}"))
            if "unique_ids_per_token" in report:
                rows.append(("unique ids per token", f"{report['unique_ids_per_token']:.2f}"))
            if verify:
                rows.append(("checksums", "ok" if report["verified"] else f"{len(report['problems'])} problem(s)"))
            for key, value in rows:
                table.add_row(key, str(value))
            console.print(table)
        if verify and not report["verified"]:
            raise KdError("; ".join(report["problems"]))
