"""Helpers for tests that run the real `kd` CLI, in a subprocess or (where a process is not the point) in-process."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
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


def run_kd_in_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `kd ARGS` through `kd.cli.main` in this process and return what a subprocess would have.

    The same argument parsing, error lines and exit codes as `run_kd`, without a fresh interpreter
    importing torch and transformers (5-10 s a call on a busy 2-core CI machine). Use it where a real
    process is not what the test checks: input refused before any work, `--print-config`, fixtures
    that only need a command's output, runs compared with each other. Keep `run_kd` for the one real
    end-to-end run of each command, kill -9, torchrun, vLLM, `--debug` tracebacks, `--help` rendering
    and anything read from the environment at import time.

    Like a process, the command writes to file descriptors 1 and 2 (captured here, C-level output
    and `kd cache-logits --json`'s dup2 included), sees `env` and the repository as its working
    directory, and torch runs at the subprocess's thread count (OMP_NUM_THREADS), so results match
    a subprocess's bit for bit. What this process would otherwise keep from its output (logging
    handlers and kd's rich console made before the call, pytest's record of warnings, transformers'
    once-only warnings) reaches the captured stderr as in a fresh process: see `_as_a_fresh_process`.
    An exception main() does not turn into an error line propagates: the test fails, as a traceback
    would fail it.
    """
    import torch

    from kd.cli import main

    saved_env, saved_cwd, saved_threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    os.environ.update(kd_env() if env is None else env)
    code = 0
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        sys.stdout.flush()
        sys.stderr.flush()
        saved_fds = {fd: os.dup(fd) for fd in (1, 2)}
        os.dup2(out_file.fileno(), 1)
        os.dup2(err_file.fileno(), 2)
        py_out = open(1, "w", encoding="utf-8", buffering=1, closefd=False)
        py_err = open(2, "w", encoding="utf-8", buffering=1, closefd=False)
        try:
            os.chdir(REPO)
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # what the subprocess would get
            with (
                _as_a_fresh_process(py_out, py_err),
                contextlib.redirect_stdout(py_out),
                contextlib.redirect_stderr(py_err),
            ):
                try:
                    main(list(args))
                except SystemExit as exc:  # main() exits 1 (or click's code) on a user error
                    if isinstance(exc.code, str):  # sys.exit("message") prints the message, exits 1
                        print(exc.code, file=sys.stderr)
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            py_out.flush()
            py_err.flush()
            for fd, saved in saved_fds.items():
                os.dup2(saved, fd)
                os.close(saved)
            torch.set_num_threads(saved_threads)
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
        out_file.seek(0)
        err_file.seek(0)
        stdout = out_file.read().decode("utf-8", errors="replace")
        stderr = err_file.read().decode("utf-8", errors="replace")
    return subprocess.CompletedProcess(["kd", *args], code, stdout, stderr)


@contextlib.contextmanager
def _as_a_fresh_process(py_out, py_err) -> Iterator[None]:
    """Output state this process set up before the call, put back as a new `kd` process would have it.

    * Logging handlers (torch's, transformers' `[transformers] ...` lines) hold the stream that was
      sys.stdout / sys.stderr when they were made: pytest's capture, not the command's fds 1 and 2.
    * transformers' `warning_once` / `info_once` remember, for the whole process, what they said.
    * kd's rich console read COLUMNS and chose colours when kd was imported, in another environment.
    * pytest records warnings for its summary; a process prints them on stderr, each location once.
    """
    from kd.pipeline.progress import console

    moved = []
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):  # PlaceHolders have none
            stream = vars(handler).get("stream")  # a property (logging's _StderrHandler) follows sys.stderr already
            target = py_out if stream is sys.stdout else py_err if stream in (sys.stderr, sys.__stderr__) else None
            if target is not None:
                moved.append((handler, stream))
                handler.stream = target
    for once in ("warning_once", "info_once"):
        getattr(getattr(logging.Logger, once, None), "cache_clear", lambda: None)()
    saved_console = dict(console.__dict__)
    try:
        with warnings.catch_warnings():  # entering it also forgets which warnings were shown (a new process)
            # A process starts with Python's filters, without the "always" pytest adds for deprecations.
            pytest_added = [("always", None, c, None, 0) for c in (DeprecationWarning, PendingDeprecationWarning)]
            warnings.filters[:] = [f for f in warnings.filters if f not in pytest_added]
            warnings.showwarning = _print_warning
            type(console).__init__(console, stderr=True)  # as kd.pipeline.progress makes it, in this env
            yield
    finally:
        console.__dict__.clear()
        console.__dict__.update(saved_console)
        for handler, stream in moved:
            handler.stream = stream


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def start_kd(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `kd ARGS` in the background (for kill and Ctrl-C tests).

    SIGINT goes back to its default in the child: a suite started in the background by a
    non-interactive shell (`make test &`) inherits SIGINT ignored, and Python keeps an ignored SIGINT
    ignored, so a Ctrl-C test would see its signal do nothing."""
    return subprocess.Popen(
        kd_cmd(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or kd_env(),
        cwd=REPO,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


def kill_train_at_first_checkpoint(common: list[str], out: Path, timeout: float = 300) -> None:
    """Start `kd COMMON --out OUT`, SIGKILL it once its first checkpoint exists, and check it died
    before finishing (the kill -9 half of every stage-two resume test)."""
    proc = start_kd(*common, "--out", str(out))
    deadline = time.time() + timeout
    while time.time() < deadline and not list((out / "checkpoints").glob("step-*/state.pt")):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists(), "killed too late"
