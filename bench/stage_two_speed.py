"""Stage two: step time, tokens/s and peak memory of cached KD against CE-only and online KD (issues 3, 11).

    .venv/bin/python bench/stage_two_speed.py [--rows 16] [--batch-size 4] [--steps 2] [--rounds 5] [--no-memory]

Student: 8 of the embedded SmolLM2-135M-Instruct's 30 layers (the demo's student). Batches: the
same GSM8K train sequences for every mode, scored by the teacher once up front (top-64 + tail and
RS-64 targets, exactly what a cache holds). One optimizer step = forward + loss + backward + AdamW.
Modes, interleaved round by round:

- ``ce``: α = 1, no teacher signal (plain fine-tuning);
- ``cached_top64``: α = 0.5, forward KL over the cached top-64 + tail;
- ``cached_rs``: α = 0.5, RS-KD from 64 draws;
- ``online``: α = 0.5, full-vocabulary KD with the live teacher's forward in every step.

Ratios: each mode's median step over the rounds ÷ CE's, and the median over rounds of the per-round
ratio (a round's modes run back to back, so they share the machine's load at that moment).

Peak memory (skipped with --no-memory): each mode again in a fresh child process; CPU reports peak
RSS (weights and AdamW state included, identical across modes), CUDA reports
torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from common import REPO, require_gsm8k, write_results

from kd.losses import LossConfig
from kd.pipeline.data import iter_examples, tokenize_example
from kd.pipeline.engines.logits_hf import TransformersTeacher
from kd.pipeline.engines.teacher import SequenceToScore, TargetSpec
from kd.pipeline.models import load_tokenizer, resolve_model
from kd.pipeline.training.batches import TrainSequence, collate
from kd.pipeline.training.students import build_student
from kd.pipeline.training.trainer import DistillStep

MODES = ("ce", "cached_top64", "cached_rs", "online")


def prepare(args, device: str):
    source = resolve_model(args.teacher, "--teacher")
    tokenizer = load_tokenizer(source)
    raw = []
    for i, example in enumerate(iter_examples(require_gsm8k() / "train.jsonl", limit=args.rows)):
        tok = tokenize_example(example, tokenizer, 2048)
        raw.append(SequenceToScore(i, np.asarray(tok.input_ids), np.asarray(tok.loss_mask, dtype=bool)))
    teacher = TransformersTeacher(source, TargetSpec("topk", k=64), device=device)
    top64 = [t for i in range(0, len(raw), 8) for t in teacher.score(raw[i : i + 8])]
    teacher.spec = TargetSpec("rs", num_samples=64)
    rs = [t for i in range(0, len(raw), 8) for t in teacher.score(raw[i : i + 8])]
    teacher_model = teacher.model.eval().requires_grad_(False)
    batches = {}
    for mode in MODES:
        seqs = [
            TrainSequence(s.input_ids, s.loss_mask, {"cached_top64": a, "cached_rs": b}.get(mode))
            for s, a, b in zip(raw, top64, rs, strict=True)
        ]
        batches[mode] = [
            collate(seqs[i : i + args.batch_size]).to(device) for i in range(0, len(seqs), args.batch_size)
        ]
    return source, teacher_model, batches


def make_step(mode: str, source, teacher_model, device: str):
    student, _, _ = build_student(None, source, "even:8", device)
    student.train()
    config = LossConfig(alpha=1.0 if mode == "ce" else 0.5, temperature=1.0, chunk_size=1024)
    module = DistillStep(student, config, teacher_model if mode == "online" else None)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    return module, optimizer


def run_steps(module, optimizer, batches, steps: int, amp: torch.dtype | None, device: str) -> int:
    tokens = 0
    for step in range(steps):
        batch = batches[step % len(batches)]
        with torch.autocast(device_type=device.split(":")[0], dtype=amp or torch.float32, enabled=amp is not None):
            parts = module(batch)
        (parts.total / batch.num_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch.attention_mask.sum())
    return tokens


def child_memory(args, device: str, amp) -> None:
    """--memory-of MODE: one mode in a fresh process; print its peak memory as JSON."""
    source, teacher_model, batches = prepare(args, device)
    module, optimizer = make_step(args.memory_of, source, teacher_model, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run_steps(module, optimizer, batches[args.memory_of], args.steps, amp, device)
    peak = (
        torch.cuda.max_memory_allocated()
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    print(json.dumps({"mode": args.memory_of, "peak_bytes": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 autocast on CUDA, fp32 on CPU), bfloat16, float32")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    amp = torch.bfloat16 if args.dtype in ("bf16", "bfloat16") or (args.dtype == "auto" and device == "cuda") else None
    torch.manual_seed(0)
    if args.memory_of:
        child_memory(args, device, amp)
        return
    source, teacher_model, batches = prepare(args, device)
    steps = {mode: make_step(mode, source, teacher_model, device) for mode in MODES}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for mode in MODES:  # warm-up
        run_steps(*steps[mode], batches[mode], 1, amp, device)
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    tokens: dict[str, int] = {}
    for _ in range(args.rounds):
        for mode in MODES:
            sync()
            t0 = time.perf_counter()
            tokens[mode] = run_steps(*steps[mode], batches[mode], args.steps, amp, device)
            sync()
            seconds[mode].append((time.perf_counter() - t0) / args.steps)
    step = {m: float(np.median(s)) for m, s in seconds.items()}
    per_round = {m: float(np.median([a / c for a, c in zip(seconds[m], seconds["ce"], strict=True)])) for m in MODES}
    memory = dict.fromkeys(MODES)
    for mode in MODES if not args.no_memory else ():
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-of",
                mode,
                "--rows",
                str(args.rows),
                "--batch-size",
                str(args.batch_size),
                "--steps",
                str(args.steps),
                "--dtype",
                args.dtype,
            ]
            + (["--teacher", args.teacher] if args.teacher else []),
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        memory[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"] if proc.returncode == 0 else None
    result = {
        "device": device,
        "autocast": args.dtype,
        "batch_size": args.batch_size,
        "step_seconds_median": step,
        "tokens_per_second": {m: tokens[m] / args.steps / step[m] for m in MODES},
        "ratio_step_cached_top64_to_ce": step["cached_top64"] / step["ce"],
        "ratio_step_cached_rs_to_ce": step["cached_rs"] / step["ce"],
        "ratio_step_online_to_ce": step["online"] / step["ce"],
        "ratio_step_to_ce_median_per_round": per_round,
        "ratio_tokens_per_second_cached_to_online": step["online"] / step["cached_top64"],
        "goal_cached_to_online": 1 + (step["online"] - step["ce"]) / step["ce"],
        "peak_memory_bytes": memory,
        "ratio_memory_cached_top64_to_ce": (memory["cached_top64"] / memory["ce"])
        if memory["ce"] and memory["cached_top64"]
        else None,
        "rounds": seconds,
    }
    write_results("stage_two_speed" + ("_gpu" if device.startswith("cuda") else ""), result)
    for mode in MODES:
        mem = memory[mode] / 2**30 if memory[mode] else float("nan")
        print(
            f"{mode:14} step {step[mode]:.3f} s   {result['tokens_per_second'][mode]:8.1f} tok/s   peak {mem:.2f} GiB"
        )
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("ratio", "goal"))}, indent=1))


if __name__ == "__main__":
    main()
