"""Helpers for tests that run the real `kd` CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def kd_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
        }
    )
    env.update(extra)
    return env


def kd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kd.cli", *args]


def run_kd(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `kd ARGS` to completion and return the completed process (text output)."""
    return subprocess.run(kd_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env or kd_env(), cwd=REPO)


def start_kd(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `kd ARGS` in the background (for kill tests)."""
    return subprocess.Popen(
        kd_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or kd_env(), cwd=REPO
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user error: non-zero exit, one `kd: error:` line naming what is wrong, no traceback."""
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def run_torchrun(*args: str, nproc: int = 2, port: str = "29500", timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc-per-node N -m kd.cli ARGS` on gloo (CPU), one thread per process."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            port,
            "-m",
            "kd.cli",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=kd_env(OMP_NUM_THREADS="1"),
        cwd=REPO,
    )
