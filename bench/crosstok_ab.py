"""The aligner against an earlier commit's: same outputs, and old ÷ new time per round (interleaved A/B).

    PYTHONPATH=$PWD .venv/bin/python bench/crosstok_ab.py CACHE STUDENT [--old-commit b8061a8] [--rounds 5]

CACHE: a top-k cache; STUDENT: a model of another tokenizer (e.g. gemma-3-270m). The earlier
kd/pipeline/training/crosstok.py is read with `git show` and loaded beside the current one; both
align every record of the cache (64 at a time, as the loader does) in alternating rounds. Outputs
compared: the student's ids (up to a closing EOS, which this version maps by role) and the
coverage figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import REPO

from kd.cache.reader import CacheReader
from kd.pipeline.models import load_tokenizer, resolve_model
from kd.pipeline.training import crosstok as new


def load_old(commit: str):
    source = subprocess.run(
        ["git", "show", f"{commit}:kd/pipeline/training/crosstok.py"], cwd=REPO, check=True, capture_output=True
    ).stdout
    path = tempfile.NamedTemporaryFile("wb", suffix=".py", delete=False)
    path.write(source)
    path.close()
    spec = importlib.util.spec_from_file_location("crosstok_old", path.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules["crosstok_old"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("student")
    parser.add_argument("--old-commit", default="b8061a8")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    old = load_old(args.old_commit)
    reader = CacheReader(args.cache)
    student = load_tokenizer(resolve_model(args.student, "student"))
    aligner_new = new.aligner_for(reader, student, load_tokenizer)
    aligner_old = old.aligner_for(reader, student, load_tokenizer)
    aligner_old.vocab_map, aligner_old.identity = aligner_new.vocab_map, aligner_new.identity  # the same map
    seqs = [s for batch in (reader.read_unit(u) for u in reader.units()) for s in reader.decode(batch)]
    out_new, out_old = aligner_new(seqs), aligner_old(seqs)
    same = sum(
        np.array_equal(x.input_ids[: len(x.input_ids) - 1], y.input_ids[: len(x.input_ids) - 1])
        for x, y in zip(out_new, out_old, strict=True)
    )
    print(f"records {len(seqs)}, same student ids: {same}")
    print("coverage new", aligner_new.stats.metrics())
    print("coverage old", aligner_old.stats.metrics())
    ratios = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        for i in range(0, len(seqs), 64):
            aligner_new(seqs[i : i + 64])
        seconds_new = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(0, len(seqs), 64):
            aligner_old(seqs[i : i + 64])
        ratios.append((time.perf_counter() - started) / seconds_new)
    print("old ÷ new time per round:", ", ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
