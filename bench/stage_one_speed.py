"""Stage one: end-to-end tokens/s against the teacher's forward-only tokens/s (issue 2).

    .venv/bin/python bench/stage_one_speed.py [--rows 32] [--batch-size 8] [--top-k 64] [--rounds 3]

One process, one loaded teacher (the embedded SmolLM2-135M-Instruct unless --teacher), the same
length-sorted batches of GSM8K train problems, modes interleaved round by round so machine noise
hits all of them alike:

- ``forward``: ``model(input_ids).logits``, the teacher's plain forward (head at every position);
- ``naive``: forward + fp32 log_softmax over the vocabulary + top-k at every position (what a cache
  that ignores the loss mask does);
- ``stage_one``: kd's engine (body, head only at loss-masked positions, top-k + logsumexp tail) plus
  building the Arrow batch and writing zstd shards on the background writer thread.

tokens/s counts every real (non-padding) token that passes through the teacher. The ratio
stage_one / forward is the issue's goal (>= 0.9).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import require_gsm8k, write_results

from kd.cache import format as fmt
from kd.cache.manifest import open_or_create
from kd.cache.writer import BackgroundShardWriter, PendingShard
from kd.pipeline.data import iter_examples, tokenize_example
from kd.pipeline.engines.logits_hf import TransformersTeacher
from kd.pipeline.engines.teacher import SequenceToScore, TargetSpec
from kd.pipeline.models import load_tokenizer, resolve_model


def batches_of(seqs: list[SequenceToScore], size: int) -> list[list[SequenceToScore]]:
    order = sorted(seqs, key=lambda s: len(s.input_ids))
    return [order[i : i + size] for i in range(0, len(order), size)]


def padded(batch: list[SequenceToScore]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s.input_ids) for s in batch)
    ids = torch.zeros((len(batch), length), dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for b, s in enumerate(batch):
        ids[b, : len(s.input_ids)] = torch.as_tensor(np.asarray(s.input_ids, dtype=np.int64))
        mask[b, : len(s.input_ids)] = 1
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    gsm8k = require_gsm8k()
    source = resolve_model(args.teacher, "--teacher")
    tokenizer = load_tokenizer(source)
    seqs = []
    for i, example in enumerate(iter_examples(gsm8k / "train.jsonl", limit=args.rows)):
        tok = tokenize_example(example, tokenizer, 2048)
        seqs.append(SequenceToScore(i, np.asarray(tok.input_ids), np.asarray(tok.loss_mask, dtype=bool)))
    batches = batches_of(seqs, args.batch_size)
    tokens = sum(len(s.input_ids) for s in seqs)
    targets = sum(int(s.loss_mask[1:].sum()) for s in seqs)
    engine = TransformersTeacher(source, TargetSpec("topk", k=args.top_k), device=args.device, dtype=args.dtype)
    model = engine.model
    vocab = engine.vocab_size
    schema = fmt.schema("topk", vocab, args.top_k, "q64")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    @torch.inference_mode()
    def forward() -> None:
        for batch in batches:
            ids, mask = padded(batch)
            model(input_ids=ids.to(args.device), attention_mask=mask.to(args.device)).logits.sum().item()

    @torch.inference_mode()
    def naive() -> None:
        for batch in batches:
            ids, mask = padded(batch)
            logits = model(input_ids=ids.to(args.device), attention_mask=mask.to(args.device)).logits
            values, top = torch.log_softmax(logits.float(), dim=-1).topk(args.top_k, dim=-1)
            values.cpu(), top.cpu()

    def stage_one(out: Path) -> None:
        open_or_create(out, {"bench": "stage_one_speed"})  # the writer records each shard in a manifest
        writer = BackgroundShardWriter(out, schema)
        try:
            for index, batch in enumerate(batches):
                scored = engine.score(batch)
                record = fmt.build_batch(
                    schema,
                    [s.row for s in batch],
                    [s.input_ids for s in batch],
                    [s.loss_mask for s in batch],
                    scored,
                    "q64",
                )
                writer.submit(PendingShard(0, index, [record], {"rows": len(batch)}))
        finally:
            writer.close()

    forward()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {"forward": [], "naive": [], "stage_one": []}
    for _ in range(args.rounds):
        for name in times:
            with tempfile.TemporaryDirectory() as tmp:
                sync()
                t0 = time.perf_counter()
                {"forward": forward, "naive": naive, "stage_one": lambda: stage_one(Path(tmp))}[name]()
                sync()
                times[name].append(time.perf_counter() - t0)
    median = {name: float(np.median(t)) for name, t in times.items()}
    result = {
        "teacher": source.display_name,
        "device": args.device,
        "dtype": str(next(model.parameters()).dtype),
        "rows": len(seqs),
        "tokens": tokens,
        "target_tokens": targets,
        "seconds_median": median,
        "tokens_per_second": {name: tokens / s for name, s in median.items()},
        "ratio_stage_one_to_forward": median["forward"] / median["stage_one"],
        "ratio_naive_to_forward": median["forward"] / median["naive"],
        "rounds": times,
    }
    if args.device.startswith("cuda"):
        params = sum(p.numel() for p in model.parameters())
        flops = 2 * params * tokens
        result["forward_tflops"] = flops / median["forward"] / 1e12
    write_results("stage_one_speed" + ("_gpu" if args.device.startswith("cuda") else ""), result)
    for name, tps in result["tokens_per_second"].items():
        print(f"{name:10} {tps:9.1f} tok/s   ({median[name]:.2f} s)")
    print(
        f"stage_one / forward = {result['ratio_stage_one_to_forward']:.3f}; "
        f"naive / forward = {result['ratio_naive_to_forward']:.3f}"
    )


if __name__ == "__main__":
    main()
