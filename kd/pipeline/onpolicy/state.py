"""What an on-policy run directory promises: its settings, one run at a time, and which steps are done.

``OUT/settings.json`` holds the resolved settings (models, prompts and mix corpus by content
fingerprint, not by path) the first time a run writes a sample. A later command into the same --out
must carry the same settings, or it is refused naming the first setting that differs; until a
sample exists nothing depends on them, so a run that failed before sampling (say, an engine that
could not load the student) may be rerun with corrected flags.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kd.cache.manifest import atomic_write_text, hold_exclusive
from kd.errors import KdError
from kd.pipeline.onpolicy.config import OnPolicyConfig

SETTINGS_FILE = "settings.json"
BOOKKEEPING = ("out", "log_every", "report_to", "keep_checkpoints", "save_every")
"""Fields that may change between runs into one --out (they change no sample, cache or weight)."""
PATHS = ("teacher", "student", "prompts", "mix_data")
"""Fields compared by the content fingerprint of what they name, not by the path as typed."""


def round_dir(out: Path, index: int) -> Path:
    return out / f"round-{index:03d}"


def settings_record(cfg: OnPolicyConfig, fingerprints: dict[str, str]) -> dict[str, Any]:
    """The settings that decide the run's samples, caches and weights."""
    values = {k: v for k, v in asdict(cfg).items() if k not in BOOKKEEPING and k not in PATHS}
    if cfg.store == "topk":  # as runs made before --store existed recorded them: they still resume
        values.pop("store")
        values.pop("hidden_encoding")
    if not cfg.cross_tokenizer:  # likewise for runs made before --cross-tokenizer existed
        values.pop("cross_tokenizer")
    values["steps_per_round"] = cfg.resolved_steps_per_round()
    return {**values, **fingerprints, "paths": {k: getattr(cfg, k) for k in PATHS}}


def flag_name(key: str) -> str:
    """The user-facing name of a settings key (``learning_rate`` -> ``--learning-rate``)."""
    if key.endswith("_fingerprint"):
        return f"the content of --{key.removesuffix('_fingerprint').replace('_', '-')}"
    return "--" + key.replace("_", "-")


class RunDirectory:
    """An --out directory held by this process (an exclusive lock) for the run's lifetime."""

    def __init__(self, out: Path) -> None:
        self.out = out
        if out.exists() and not out.is_dir():
            raise KdError(f"--out {out}: exists and is not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except PermissionError as exc:
            raise KdError(f"--out {out}: not writable ({exc.strerror})") from exc
        self._lock = hold_exclusive(out / ".lock", f"--out {out}: another kd on-policy is running there; wait for it")

    def has_samples(self) -> bool:
        """Whether any round has written a sample (from then on the settings are binding)."""
        first = round_dir(self.out, 0)
        ledger = first / "samples.raw.jsonl"
        return (first / "samples.jsonl").is_file() or (ledger.is_file() and ledger.stat().st_size > 0)

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Record the settings of a new run, or refuse a command whose settings differ from the run's."""
        path = self.out / SETTINGS_FILE
        if path.is_file():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise KdError(f"{path}: corrupt settings file ({exc.msg}); use another --out") from exc
            old_core = {k: v for k, v in old.items() if k != "paths"}
            new_core = {k: v for k, v in settings.items() if k != "paths"}
            if old_core == new_core:
                return
            if self.has_samples():
                key = next(k for k in sorted(set(old_core) | set(new_core)) if old_core.get(k) != new_core.get(k))
                raise KdError(
                    f"--out {self.out}: the run there was made with {flag_name(key)} {old_core.get(key)!r}, "
                    f"not {new_core.get(key)!r}; rerun it with its settings or choose another --out"
                )
            # Nothing was sampled under the old settings: start afresh under the new ones.
            shutil.rmtree(self.out / "student-init", ignore_errors=True)
            shutil.rmtree(round_dir(self.out, 0), ignore_errors=True)
        elif any(p.name.startswith("round-") for p in self.out.iterdir()):
            raise KdError(f"--out {self.out}: holds rounds but no {SETTINGS_FILE}; choose another --out")
        atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")

    def close(self) -> None:
        self._lock.close()
