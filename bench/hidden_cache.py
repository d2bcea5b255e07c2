"""Hidden-state caches (issue 22): bytes per target token, reconstruction KL, hidden-KD step cost.

    .venv/bin/python bench/hidden_cache.py [--rows 100] [--rounds 5] [--threads 1] [--data gsm8k/train.jsonl]
    .venv/bin/python bench/hidden_cache.py --memory     # only part 4 (seconds; no caches needed)

1. Caches the embedded SmolLM2-135M-Instruct teacher (d = 576, V = 49,152) over the first --rows
   GSM8K train problems (targets: the answers) as top-64 (the default cache) and as hidden states
   in float32, bf16 and int8; bytes per target token from the shards on disk (`kd inspect`'s
   figure), and the teacher head's size (once per cache).
2. KL(exact teacher || teacher rebuilt from the bf16 / int8 rows) per target token, exact = the
   float32 cache's rows through the same head (full vocabulary, fp64).
3. Head + loss of one chunk of 1,024 targets at SmolLM2's sizes (student width 576, random
   weights, fp32), interleaved rounds: CE only, top-64 KD + CE, hidden-cache KD + CE (the teacher
   head's matmul inside the fused loss), medians; and the FLOPs the teacher head adds, divided by
   those of the student's step.
4. Peak memory of that head + loss step above its inputs, per mode, each mode in a fresh process
   (peak RSS, `ru_maxrss`, minus the RSS once the inputs exist), ÷ CE's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from common import WORK, require_gsm8k, run_step, write_results

from kd.cache.reader import CacheReader
from kd.losses import DenseTeacher, LossConfig, SparseTeacher, distill_loss_sum
from kd.pipeline.training.hidden_teacher import load_cached_teacher_head

CACHES = {
    "top64": [],
    "hidden-float32": ["--store", "hidden", "--hidden-encoding", "float32"],
    "hidden-bf16": ["--store", "hidden", "--hidden-encoding", "bf16"],
    "hidden-int8": ["--store", "hidden", "--hidden-encoding", "int8"],
}


def cache_sizes(rows: int, data: str | None) -> dict:
    data = data or str(require_gsm8k() / "train.jsonl")
    out = WORK / f"hidden-cache-{rows}"
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, flags in CACHES.items():
        cache = out / name
        run_step(
            ["cache-logits", "--data", data, "--limit", str(rows), "--out", str(cache), *flags],
            cache / "manifest.json",
            out / f"{name}.log",
        )
        reader = CacheReader(cache)
        targets = sum(s["targets"] for s in reader.shards)
        head = reader.manifest.get("teacher_head")
        sizes[name] = {
            "targets": targets,
            "bytes_per_target_token": sum(s["bytes"] for s in reader.shards) / targets,
            "head_bytes": head["bytes"] if head else None,
        }
    return {"dir": str(out), "sizes": sizes}


def reconstruction_kl(cache_dir: str) -> dict:
    """Per-token KL(exact || rebuilt) of the bf16 and int8 caches against the float32 one."""
    exact_reader = CacheReader(f"{cache_dir}/hidden-float32")
    head = load_cached_teacher_head(exact_reader)
    weight = head.weight.double()
    result = {}
    for name in ("hidden-bf16", "hidden-int8"):
        kls = []
        for exact, got in zip(
            exact_reader.iter_sequences(), CacheReader(f"{cache_dir}/{name}").iter_sequences(), strict=True
        ):
            p = torch.log_softmax(torch.from_numpy(exact.teacher.hidden).double() @ weight.T, dim=-1)
            q = torch.log_softmax(torch.from_numpy(got.teacher.hidden).double() @ weight.T, dim=-1)
            kls.append((p.exp() * (p - q)).sum(dim=-1).numpy())
        kl = np.concatenate(kls)
        result[name] = {"mean": float(kl.mean()), "p99": float(np.quantile(kl, 0.99)), "max": float(kl.max())}
    return result


def head_loss_times(rounds: int, n: int = 1024, vocab: int = 49152, width: int = 576) -> dict:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, width, generator=g)
    weight = (torch.randn(vocab, width, generator=g) * 0.05).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    teacher_hidden = torch.randn(n, width, generator=g)
    teacher_weight = torch.randn(vocab, width, generator=g) * 0.05
    with torch.no_grad():
        logp = torch.log_softmax(teacher_hidden @ teacher_weight.T, dim=-1)
        values, ids = logp.topk(64, dim=-1)
        tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), dim=-1)
    signals = {
        "ce": None,
        "top64": SparseTeacher(ids, values, tail),
        "hidden": DenseTeacher(teacher_hidden=teacher_hidden, teacher_head_weight=teacher_weight),
    }
    config = LossConfig(alpha=0.5, chunk_size=n)
    times: dict[str, list[float]] = {k: [] for k in signals}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for name, signal in signals.items():
            h = hidden.clone().requires_grad_(True)
            start = time.perf_counter()
            distill_loss_sum(h, weight, None, labels, signal, config).total.backward()
            times[name].append(time.perf_counter() - start)
            weight.grad = None
    medians = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {k: {"seconds": v, "over_ce": v / medians["ce"]} for k, v in medians.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_memory_child(mode: str, n: int = 1024, vocab: int = 49152, width: int = 576) -> None:
    """One head + loss step of `mode` in this (fresh) process; prints its peak RSS above the inputs.

    The top-64 rows are random (sorted, normalised) rather than cut from full teacher logits, so that
    no [n, V] tensor exists before the step: the process's peak is the step's."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, width, generator=g).requires_grad_(True)
    weight = (torch.randn(vocab, width, generator=g) * 0.05).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    signal = None
    if mode == "top64":
        values = torch.log_softmax(torch.randn(n, 65, generator=g), dim=-1).sort(dim=-1, descending=True).values
        signal = SparseTeacher(torch.randint(0, vocab, (n, 64), generator=g), values[:, :64], values[:, 64])
    elif mode == "hidden":
        signal = DenseTeacher(teacher_hidden=torch.randn(n, width, generator=g),
                              teacher_head_weight=torch.randn(vocab, width, generator=g) * 0.05)  # fmt: skip
    base = _rss_bytes()
    distill_loss_sum(hidden, weight, None, labels, signal, LossConfig(alpha=0.5, chunk_size=n)).total.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"mode": mode, "above_inputs_bytes": peak - base}))


def head_loss_peak_memory() -> dict:
    """Part 4: each mode in its own process (a process's peak RSS never comes down)."""
    out = {}
    for mode in ("ce", "top64", "hidden"):
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-of", mode], capture_output=True, text=True, check=True
        )
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["above_inputs_bytes"]
    return {m: {"bytes": b, "over_ce": b / out["ce"]} for m, b in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", help="GSM8K train.jsonl elsewhere than ../shared/data/gsm8k")
    parser.add_argument("--memory", action="store_true", help="only the peak memory part (4)")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # the child process of part 4
    args = parser.parse_args()
    if args.memory_of:
        return peak_memory_child(args.memory_of)
    if args.memory:
        memory = head_loss_peak_memory()
        for name, row in memory.items():
            print(f"{name:8s} peak above inputs {row['bytes'] / 2**20:8.1f} MiB  / CE {row['over_ce']:.3f}")
        write_results("hidden_cache_memory", memory)
        return None
    torch.set_num_threads(args.threads)
    sizes = cache_sizes(args.rows, args.data)
    kl = reconstruction_kl(sizes["dir"])
    times = head_loss_times(args.rounds)
    # FLOPs per target token. Teacher head: 2 V d. Student head + loss step: 6 V H (forward and two
    # backward matmuls). A full student step adds ~6 P_body per token: the 8-layer student cut from
    # SmolLM2 (as in `kd demo`) has P_body = 8 x 3.54M (attention 0.88M + MLP 2.65M per layer).
    vocab, d, width = 49152, 576, 576
    body = 8 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    flops = {
        "teacher_head_over_student_head_step": (2 * vocab * d) / (6 * vocab * width),
        "teacher_head_over_student_full_step": (2 * vocab * d) / (6 * vocab * width + 6 * body),
    }
    for name, row in sizes["sizes"].items():
        print(f"{name:15s} {row['bytes_per_target_token']:8.1f} B/target token  head {row['head_bytes']}")
    for name, row in kl.items():
        print(f"{name:15s} KL to exact: mean {row['mean']:.2e}  p99 {row['p99']:.2e}  max {row['max']:.2e}")
    for name, row in times.items():
        print(f"{name:15s} {row['seconds']:.3f} s  / CE {row['over_ce']:.3f}")
    print(f"teacher head FLOPs / student step: {flops}")
    write_results("hidden_cache", {"sizes": sizes, "kl": kl, "head_loss": times, "flops": flops})


if __name__ == "__main__":
    main()
