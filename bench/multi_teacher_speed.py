"""Several teachers in stage two: loader throughput with two caches side by side, and the loss step's cost.

    .venv/bin/python bench/multi_teacher_speed.py [--rows 400] [--batch-size 8] [--rounds 3] [--tokens 2048]

Loader: a top-64 and an RS-64 cache of the embedded SmolLM2-135M-Instruct over the first --rows
GSM8K train records (made once with `kd cache-logits`, kept in bench/out/multi-teacher-*). The
streaming loader's producer work (read each record batch, decode, collate --batch-size sequences)
is timed for the top-64 cache alone and for both caches read side by side (`CacheSet` +
`TeacherCollator`, what `--from-cache A --from-cache B` runs), and both aligned to a student with
Gemma-3's tokenizer (`--cross-tokenizer`; the student's targets). targets/s counts the targets
handed to the loss. Loss step: forward + backward of the fused head (SmolLM2-135M's shape: hidden
576, vocabulary 49,152) on --tokens targets against one top-64 teacher, two in `sum` mode and two
in `mixture` mode (random teachers whose top-64 ids mostly differ: the union is ~128 wide).
Rounds are interleaved; medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import REPO, WORK, kd_env, require_gsm8k, write_results

from kd.cache.reader import CacheReader
from kd.losses import LossConfig, SparseTeacher, TeacherSet, distill_loss_sum, teachers_loss_sum
from kd.pipeline.models import gemma3_gguf_path, gguf_tokenizer_dir, load_tokenizer
from kd.pipeline.training.batches import collate
from kd.pipeline.training.crosstok import aligner_for
from kd.pipeline.training.multiteacher import CacheSet, TeacherCollator


def make_cache(gsm8k: Path, rows: int, name: str, *extra: str) -> Path:
    cache = WORK / f"multi-teacher-{name}-{rows}"
    if not (cache / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "kd.cli", "cache-logits", "--data", str(gsm8k / "train.jsonl")]
        cmd += ["--limit", str(rows), "--engine", "transformers", "--out", str(cache), *extra]
        subprocess.run(cmd, check=True, env=kd_env(), cwd=REPO)
    return cache


def loader_rate(reader, collator, batch_size: int) -> tuple[float, int]:
    """Targets/s of read + decode (+ hook) + collate over every record batch (the producer thread's work)."""
    targets, started = 0, time.perf_counter()
    for unit in reader.units():
        seqs = reader.decode(reader.read_unit(unit))
        if collator is not None:
            seqs = collator(seqs)  # the loader's hook: every cache's record as the student's sequence
        for i in range(0, len(seqs), batch_size):
            part = seqs[i : i + batch_size]
            targets += (collator.collate(part) if collator else collate(part)).num_targets
    return targets / (time.perf_counter() - started), targets


def random_topk(n: int, vocab: int, k: int, seed: int) -> SparseTeacher:
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(n, vocab, generator=g) * 4.0, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    tail = torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-6))
    return SparseTeacher(ids, values, tail)


def step_seconds(teacher, tokens: int, hidden_size: int, vocab: int) -> float:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.05).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    config = LossConfig(alpha=0.5)
    started = time.perf_counter()
    if isinstance(teacher, TeacherSet):
        parts, _ = teachers_loss_sum(hidden, weight, None, labels, teacher, config)
    else:
        parts = distill_loss_sum(hidden, weight, None, labels, teacher, config)
    parts.total.backward()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--gsm8k", type=Path, help="GSM8K folder (default: ../shared/data/gsm8k beside the repo)")
    args = parser.parse_args()
    gsm8k = args.gsm8k or require_gsm8k()
    topk = CacheReader(make_cache(gsm8k, args.rows, "top64", "--top-k", "64"))
    rs = CacheReader(make_cache(gsm8k, args.rows, "rs64", "--sampling", "rs", "--samples", "64"))
    both = CacheSet([topk, rs])
    collator = TeacherCollator((0.5, 0.5), "sum")

    from transformers import AutoTokenizer

    gemma = AutoTokenizer.from_pretrained(str(gguf_tokenizer_dir(gemma3_gguf_path())))
    crossed = TeacherCollator((0.5, 0.5), "sum", [aligner_for(r, gemma, load_tokenizer) for r in (topk, rs)])

    one_rate, two_rate, cross_rate = [], [], []
    for _ in range(args.rounds):
        rate, targets = loader_rate(topk, None, args.batch_size)
        one_rate.append(rate)
        rate, both_targets = loader_rate(both, collator, args.batch_size)
        two_rate.append(rate)
        rate, student_targets = loader_rate(both, crossed, args.batch_size)
        cross_rate.append(rate)
    assert targets == both_targets

    vocab, hidden_size, k = 49152, 576, 64
    teachers = [random_topk(args.tokens, vocab, k, seed) for seed in (1, 2)]
    cases = {
        "one_teacher": teachers[0],
        "sum_of_two": TeacherSet(teachers, (0.5, 0.5), "sum"),
        "mixture_of_two": TeacherSet(teachers, (0.5, 0.5), "mixture"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, teacher in cases.items():
            seconds[name].append(step_seconds(teacher, args.tokens, hidden_size, vocab))
    result = {
        "rows": topk.num_rows,
        "targets": targets,
        "loader_targets_per_second_one_cache": statistics.median(one_rate),
        "loader_targets_per_second_two_caches": statistics.median(two_rate),
        "loader_ratio": statistics.median(t / o for t, o in zip(two_rate, one_rate, strict=True)),
        "student_targets_gemma3": student_targets,
        "loader_targets_per_second_two_caches_to_gemma3": statistics.median(cross_rate),
        **{f"gemma3_{k}": v for k, v in crossed.stats.metrics().items() if k.startswith("crosstok")},
        "loss_tokens": args.tokens,
        **{f"loss_step_seconds_{name}": statistics.median(s) for name, s in seconds.items()},
        "threads": torch.get_num_threads(),
    }
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    write_results("multi_teacher_speed", result)


if __name__ == "__main__":
    main()
