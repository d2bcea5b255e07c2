"""manifest.json: what a cache holds and how it was made.

Several processes (ranks) may write into one cache, so every update happens under an exclusive
file lock and is written to a temp file that replaces manifest.json atomically. A reader never sees
a half-written manifest, and a shard appears in it only after its file was fsynced and renamed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from kd import __version__
from kd.errors import KdError

MANIFEST = "manifest.json"
LOCK = ".manifest.lock"


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that it is either the old or the new content, never a mix (tmp + fsync + rename)."""
    atomic_write_lines(path, (text,))


def atomic_write_lines(path: Path, lines: Iterable[str]) -> None:
    """atomic_write_text for content streamed in pieces (a large JSONL never held as one string)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(cache_dir: Path) -> Iterator[None]:
    """Exclusive lock over manifest updates of one cache (works across processes on one host/NFS-less FS)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    """The manifest of a cache, or None if the directory has none yet."""
    path = cache_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KdError(f"{path}: corrupt manifest ({exc}); this is not a cache kd wrote") from exc
    if not isinstance(manifest, dict):
        kind = type(manifest).__name__
        raise KdError(f"{path}: corrupt manifest (a JSON {kind}, not an object); this is not a cache kd wrote")
    for key, kind in (("settings", dict), ("shards", list)):
        if not isinstance(manifest.get(key), kind):
            raise KdError(f"{path}: corrupt manifest (no '{key}' {kind.__name__}); this is not a cache kd wrote")
    return manifest


def hold_exclusive(path: Path, refusal: str, mode: str = "a") -> IO[Any]:
    """Open `path` and hold an exclusive lock on it while the returned file stays open.

    The one lock kd's long runs take on their output (cache-logits per rank, gen-traces' ledger,
    on-policy's run directory): a second run into the same place is refused with `refusal` at once
    instead of writing through the same temp names. The kernel drops the lock if the process dies.
    """
    lock = open(path, mode)  # noqa: SIM115 - held for the caller's run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        lock.close()
        raise KdError(refusal) from exc
    return lock


def _refuse_foreign(cache_dir: Path) -> None:
    """Refuse an --out that is a file, or a non-empty directory that is not a cache, before creating anything in it."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise KdError(f"--out {cache_dir}: exists and is not a directory")
    if not cache_dir.is_dir() or (cache_dir / MANIFEST).is_file():
        return
    leftovers = [p.name for p in cache_dir.iterdir() if p.name != "config.yaml" and not p.name.startswith(".")]
    if leftovers:
        raise KdError(f"--out {cache_dir}: directory is not empty and has no manifest.json; choose another")


def claim_rank(cache_dir: Path, rank: int) -> IO[Any]:
    """Create the cache directory and hold its rank `rank` for this run; refuse a second writer of that rank."""
    _refuse_foreign(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        return hold_exclusive(
            cache_dir / f".rank-{rank:03d}.lock",
            f"--out {cache_dir}: another kd cache-logits writes rank {rank} there; wait for it or use another --out",
        )
    except PermissionError as exc:
        raise KdError(f"--out {cache_dir}: not writable ({exc.strerror})") from exc


def _write(cache_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(cache_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def describe_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """First setting that differs between two settings dicts, as 'key: old -> new'."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = describe_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a!r} -> {b!r}"
    return ""


def open_or_create(cache_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Start a cache, or join/resume one made with exactly the same settings; refuse any other."""
    _refuse_foreign(cache_dir)  # before `locked` creates its lock file there
    with locked(cache_dir):
        manifest = read_manifest(cache_dir)
        if manifest is None:
            _refuse_foreign(cache_dir)
            manifest = {
                "kd_version": __version__,
                "settings": settings,
                "shards": [],
                "ranks": {},
                "complete": False,
            }
            _write(cache_dir, manifest)
            return manifest
        if manifest.get("settings") != settings and not manifest.get("shards"):
            # No shard was finished under the old settings (a run refused or killed before its first
            # one): nothing depends on them, so the corrected command starts the cache afresh.
            manifest = {**manifest, "settings": settings, "ranks": {}, "complete": False}
            _write(cache_dir, manifest)
            return manifest
        if manifest.get("settings") != settings:
            diff = describe_difference(manifest.get("settings", {}), settings)
            raise KdError(
                f"--out {cache_dir}: the cache there was made with different settings ({diff}); "
                "use another --out directory or delete it"
            )
        return manifest


def record_shard(cache_dir: Path, shard: dict[str, Any]) -> None:
    """Add a finished shard (already renamed into place) to the manifest."""
    with locked(cache_dir):
        manifest = read_manifest(cache_dir)
        assert manifest is not None
        manifest["shards"] = [s for s in manifest["shards"] if s["file"] != shard["file"]] + [shard]
        manifest["shards"].sort(key=lambda s: (s["rank"], s["index"]))
        _write(cache_dir, manifest)


def record_rank_done(cache_dir: Path, rank: int, stats: dict[str, Any]) -> dict[str, Any]:
    """Mark a rank finished; the cache is complete once every rank of world_size is."""
    with locked(cache_dir):
        manifest = read_manifest(cache_dir)
        assert manifest is not None
        manifest["ranks"][str(rank)] = {"complete": True, **stats}
        world_size = manifest["settings"]["world_size"]
        manifest["complete"] = all(manifest["ranks"].get(str(r), {}).get("complete") for r in range(world_size))
        _write(cache_dir, manifest)
        return manifest
