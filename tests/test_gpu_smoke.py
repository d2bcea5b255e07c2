"""bench/gpu.py --smoke: the one-command GPU benchmark runs end to end on CPU, so it cannot rot.

    .venv/bin/python -m pytest tests/test_gpu_smoke.py -q

Tiny random-weight models, a few steps, fp32 on CPU. Checks that every GPU row of BENCHMARKS.md
comes out as a finite number (the hidden-cache step ratio with its shape-dependent goal) and that
the markdown table is written. No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

STEP_MODES = ("cached_top64", "cached_rs", "cached_hidden", "online")
ROWS = {
    "stage_one_tokens_per_second",
    "stage_one_forward_tokens_per_second",
    "stage_one_ratio_to_forward",
    "stage_one_rs_tokens_per_second",
    "stage_one_tflops",
    "stage_one_share_of_peak",
    "stage_one_share_of_matmul",
    "head_time_top64_to_ce",
    "head_time_rs_to_ce",
    "head_time_matmuls_to_ce",
    "head_memory_top64_to_ce",
    "head_memory_rs_to_ce",
    "step_ce_seconds",
    "step_ce_tokens_per_second",
    "step_ce_peak_gib",
    *(f"step_time_{m}_to_ce" for m in STEP_MODES),
    *(f"step_memory_{m}_to_ce" for m in STEP_MODES),
    *(f"step_memory_above_weights_{m}_to_ce" for m in STEP_MODES),
}


@pytest.mark.slow
def test_gpu_bench_smoke_writes_every_row(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--smoke", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    rows = {row["key"]: row for row in result["rows"]}
    assert set(rows) == ROWS
    for key in ROWS:
        assert rows[key]["status"] == "measured", rows[key]
        assert math.isfinite(rows[key]["value"]) and rows[key]["value"] > 0, rows[key]
    assert rows["step_time_cached_hidden_to_ce"]["goal"].startswith("≤ 1.")  # 1 + head FLOPs / step FLOPs
    assert result["preset"] == "smoke" and result["notes"] == {}
    table = (tmp_path / "gpu.md").read_text()
    assert "| row | value | unit | goal | note |" in table
    assert table.count("\n|") == len(rows) + 2  # header, rule, one line per row
    assert "| row | value | unit | goal | note |" in proc.stdout  # the table is printed too


def load_gpu_bench():
    """bench/gpu.py as a module (it imports its neighbours common and head_loss_speed by name)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("kd_bench_gpu", REPO / "bench" / "gpu.py")
        gpu = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = gpu  # dataclasses look their module up there
        spec.loader.exec_module(gpu)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return gpu


def test_gpu_bench_skips_parts_past_the_deadline(tmp_path: Path) -> None:
    """A budget already spent skips every part with a note instead of overrunning."""
    gpu = load_gpu_bench()
    result = gpu.main(["--smoke", "--device", "cpu", "--budget-s", "0", "--out", str(tmp_path)])
    assert set(result["notes"]) == {"stage_one", "head", "step"}
    assert all(row["status"] == "skipped" for row in result["rows"])
    assert all("budget" in note for note in result["notes"].values())
    assert (tmp_path / "gpu.md").is_file()


def test_gpu_bench_a_failing_part_leaves_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One call of a lent GPU must bring back what it measured: a part that raises is noted, the run goes on."""
    gpu = load_gpu_bench()

    def broken(*_args):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu, "head_alone", broken)
    result = gpu.main(["--smoke", "--device", "cpu", "--parts", "head", "--out", str(tmp_path)])
    head = [row for row in result["rows"] if row["key"].startswith("head_")]
    assert head and all(row["status"] == "failed" and "RuntimeError (boom)" in row["note"] for row in head)
    assert result["notes"]["stage_one"] == "not run (--parts)"
    assert json.loads((tmp_path / "gpu.json").read_text())["notes"] == result["notes"]
