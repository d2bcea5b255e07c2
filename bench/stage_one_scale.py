"""Stage one at corpus scale (issue 10): peak RSS and time to the first teacher forward against corpus size.

    .venv/bin/python bench/stage_one_scale.py            # 1/16 of GSM8K train and all of it, ~10 min on 2 cores

`kd cache-logits --teacher TINY --data gsm8k/train.jsonl --limit N --top-k 64 --json` with a tiny
random 2-layer Llama teacher (hidden 128, the real SmolLM2 tokenizer: tests/conftest.py), so that
the corpus path, not the teacher, decides the memory. Each run is a fresh child process; its peak
RSS comes from os.wait4, its seconds to the first teacher forward and the memory it held
(peak sequences and target tokens) from its --json summary. Results in bench/results/stage_one_scale.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from common import REPO, WORK, child_run, require_gsm8k, write_results

SCALE = WORK / "stage-one-scale"


def tiny_teacher() -> Path:
    sys.path.insert(0, str(REPO))
    from kd.pipeline.models import embedded_gguf_path, gguf_to_hf_dir
    from tests.conftest import build_tiny_model_dir

    teacher = SCALE / "tiny-teacher"
    if not (teacher / "config.json").is_file():
        build_tiny_model_dir(teacher, gguf_to_hf_dir(embedded_gguf_path()))
    return teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--extra", nargs="*", default=[], help="more kd cache-logits flags")
    args = parser.parse_args()
    gsm8k = require_gsm8k()
    train = gsm8k / "train.jsonl"
    total = sum(1 for line in open(train) if line.strip())
    teacher = tiny_teacher()
    runs = {}
    for name, limit in (("1/16", total // 16), ("all", total)):
        out = SCALE / f"cache-{limit}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = ["cache-logits", "--teacher", str(teacher), "--data", str(train), "--limit", str(limit)]
        cmd += ["--out", str(out), "--top-k", str(args.top_k), *args.extra]
        print("run    kd " + " ".join(cmd), flush=True)
        runs[name] = {"records": limit, **child_run(cmd)}
        r = runs[name]
        print(
            f"{name:5} {limit:5} records  peak RSS {r['peak_rss_mb']:7.0f} MB  first forward "
            f"{r['first_forward_seconds']:5.2f} s  held <= {r['peak_sequences_held']} sequences / "
            f"{r['peak_targets_held']:,} targets  {r['targets']:,} targets in {r['seconds']:.0f} s",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)
    result = {
        "teacher": "tiny random Llama (2 layers, hidden 128, SmolLM2 tokenizer)",
        "runs": runs,
        "rss_ratio": runs["all"]["peak_rss_mb"] / runs["1/16"]["peak_rss_mb"],
        "first_forward_ratio": runs["all"]["first_forward_seconds"] / runs["1/16"]["first_forward_seconds"],
    }
    write_results("stage_one_scale", result)
    print(f"peak RSS all / (1/16) = {result['rss_ratio']:.3f}; first forward = {result['first_forward_ratio']:.3f}")


if __name__ == "__main__":
    main()
