"""`kd demo` end to end on the embedded teacher, shrunk to a few problems, then rerun.

    .venv/bin/python -m pytest tests/test_demo.py -q

The full-size demo is `make demo`; this checks the same steps on a budget CI can afford: every
artefact and the report exist, the report's table holds the three models, and a second run reuses
every finished step instead of recomputing it.

Generation dominates the time (teacher traces, the teacher's held-out answers, both students' answers
and samples in compare), and it is budget-bound: the cut students never stop early. The demo refuses
a run whose teacher finished no trace; 128 new tokens kept every trace that 160 finished (3 of 6, at
70, 124 and 126 tokens, on a 2-core x86 CI machine): each sample draws from its own seeded generator,
so a smaller budget cuts the same traces short, it does not change them. The first run is the real
`kd demo` process; the rerun, which finds every step done and rewrites the report, runs in this
process (tests/helpers.py: run_kd_in_process).
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_kd, run_kd_in_process


@pytest.mark.slow
def test_demo_runs_and_reruns_from_its_finished_steps(tmp_path):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--train-problems",
        "6",
        "--eval-problems",
        "3",
        "--samples",
        "1",
        "--max-new-tokens",
        "128",
        "--epochs",
        "1",
        "--batch-size",
        "1",
        "--engine",
        "transformers",
    ]
    first = run_kd(*args, timeout=2400)
    assert first.returncode == 0, first.stderr[-3000:]
    report = (out / "report.md").read_text()
    for row in ("| teacher |", "| KD student |", "| CE-only student |"):
        assert row in report
    assert (out / "curves.png").stat().st_size > 1000 and (out / "accuracy.png").stat().st_size > 1000
    comparison = json.loads((out / "compare" / "compare.json").read_text())
    students = {row["model"]: row for row in comparison["models"]}
    for metrics in (json.loads((out / "eval-teacher.json").read_text()), *students.values()):
        assert metrics["tokens"] > 0 and "answer_accuracy" in metrics
    assert json.loads((out / "eval-teacher.json").read_text())["kl"] == pytest.approx(0.0, abs=0.02)
    assert comparison["baseline"] == "student-ce" and comparison["comparisons"][0]["model"] == "student-kd"
    assert (out / "compare" / "compare.md").is_file()
    assert (out / "student-kd" / "model.safetensors").is_file()
    assert "kd gen-traces" in report and "kd cache-logits" in report and "kd train" in report
    # Held-out figures carry 95% intervals; each verdict is read from the paired interval of KD − CE-only.
    for metrics in students.values():
        lo, hi = metrics["ce_ci"]
        assert lo <= metrics["ce"] <= hi
    verdicts = [line for line in report.splitlines() if line.startswith("- ") and "→" in line]
    assert len(verdicts) == len(comparison["comparisons"][0]["metrics"]) >= 3
    assert all(("KD better" in v) or ("CE-only better" in v) or ("within noise" in v) for v in verdicts)
    assert all("difference" in v for v in verdicts)
    assert (out / "config.yaml").is_file()

    artefacts = [
        out / "traces.jsonl",
        out / "cache-train" / "manifest.json",
        out / "student-kd" / "model.safetensors",
        out / "student-ce" / "model.safetensors",
        out / "eval-teacher.json",
    ]
    stamps = [p.stat().st_mtime_ns for p in artefacts]
    second = run_kd_in_process(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("reused") == 9  # every step
    assert [p.stat().st_mtime_ns for p in artefacts] == stamps  # and nothing was rewritten


def test_demo_settings_bind_a_rerun_but_tolerate_settings_added_since(tmp_path):
    """A rerun into OUT with other settings is refused; a recorded file without a setting kd added later
    (at its default) is the same demo, so it resumes instead of being refused."""
    from kd.errors import KdError
    from kd.pipeline.evaluation.demo import DemoConfig, check_settings

    out = tmp_path / "demo"
    out.mkdir()
    check_settings(out, DemoConfig(out=str(out)))
    recorded = json.loads((out / "demo-settings.json").read_text())
    assert recorded["filter"] == "all"
    del recorded["filter"]  # as a demo made before --filter existed recorded it
    (out / "demo-settings.json").write_text(json.dumps(recorded))
    check_settings(out, DemoConfig(out=str(out)))
    with pytest.raises(KdError, match="other settings"):
        check_settings(out, DemoConfig(out=str(out), filter="correct"))
    with pytest.raises(KdError, match="--filter maybe: expected all or correct"):
        DemoConfig(out=str(out), filter="maybe")
