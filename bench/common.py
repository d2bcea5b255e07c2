"""Shared helpers of the benchmarks: where GSM8K lives, running `kd` steps once, writing results.

Benchmarks never run in `make test`; each script says how to run it and writes its numbers to
bench/results/<name>.json, which BENCHMARKS.md quotes together with the command.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
RESULTS = REPO / "bench" / "results"
WORK = REPO / "bench" / "out"


def require_gsm8k() -> Path:
    """GSM8K lies outside the repository; a user's clone has none, so benchmarks stop cleanly without it."""
    if not (GSM8K / "train.jsonl").is_file():
        print(f"skipped: {GSM8K}/train.jsonl not found (GSM8K is not shipped with kd)")
        sys.exit(0)
    return GSM8K


def kd_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_step(args: list[str], done: Path, log: Path | None = None) -> float:
    """Run `kd ARGS` unless `done` exists; returns the wall seconds (0 when reused)."""
    if done.exists():
        print(f"reuse  {done}")
        return 0.0
    line = "kd " + " ".join(shlex.quote(a) for a in args)
    print(f"run    {line}", flush=True)
    started = time.perf_counter()
    with open(log, "w") if log else tempfile.TemporaryFile("w+") as sink:
        proc = subprocess.run(
            [sys.executable, "-m", "kd.cli", *args],
            stderr=sink,
            stdout=subprocess.PIPE,
            text=True,
            env=kd_env(),
            cwd=REPO,
        )
        if proc.returncode != 0 and log is None:  # no log file: say kd's own last lines here
            sink.seek(0)
            tail = "".join(sink.readlines()[-5:]).rstrip()
            raise SystemExit(f"failed ({proc.returncode}): {line}\n{tail}")
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {line}; see {log}")
    if proc.stdout and done.suffix == ".json" and not done.exists():
        done.write_text(proc.stdout)
    return time.perf_counter() - started


def child_run(args: list[str]) -> dict:
    """Run `kd ARGS --json` as a child: its own peak RSS (MB) from wait4, wall time and JSON summary."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kd.cli", *args, "--json"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=kd_env(),
            cwd=REPO,
        )
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"kd {' '.join(args)} failed:\n{err.read()[-2000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "wall_seconds": time.perf_counter() - started, **summary}


def machine() -> dict[str, str]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_count": str(os.cpu_count()),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "gpu": gpu or "none",
    }


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path
