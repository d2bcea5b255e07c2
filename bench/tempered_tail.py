"""Temperature with a top-k cache, and the sqrt8 bound per k, against the teacher's own full logits (issue 19).

    .venv/bin/python bench/tempered_tail.py [--rows 40] [--data PATH/gsm8k/train.jsonl]

Caches the embedded SmolLM2-135M-Instruct teacher over the first --rows GSM8K train problems (loss
mask: the answers) at top-64, sqrt8 values: once without tempered tails, once with
`--temperatures 0.5,1,2,4`, and once more with float32 values. Then runs the teacher (fp32) over the
cached sequences and, at every target, compares with the exact distribution from the full logits:

* tempered: KL(exact_T bucketed ‖ kd's target_T) per target token at T = 0.5, 2, 4, where the
  buckets are the cached ids plus one tail, exact_T = softmax(z/T) summed into them, and kd's target
  is the cache re-tempered: *before* (kd until now) with the tail spread evenly over the uncached
  ids, *after* with the recorded tempered tail (sqrt8 and float32 values);
* sqrt8: KL(exact ‖ stored) at T = 1 per k (16, 64, 128, 256): the top-k of the full logits encoded
  as sqrt8 values with the q64 tail and decoded as a reader does, against the bound 2k/360²;
  plus the adversarial row of `tests/test_tempered_tail.py` per k;
* bytes per target token the tempered tails add (from the shards on disk).

Writes bench/results/tempered_tail.json.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import REPO, WORK, kd_env, require_gsm8k, run_step, write_results

from kd.cache import format as fmt
from kd.cache.reader import CacheReader
from kd.cache.sizes import bytes_breakdown
from kd.losses import retemper_sparse
from kd.pipeline.engines.head import topk_with_tail
from kd.pipeline.models import embedded_gguf_path, gguf_to_hf_dir

TEMPERATURES = (0.5, 2.0, 4.0)
SQRT8_KS = (16, 64, 128, 256)


def old_retemper(logp: torch.Tensor, tail: torch.Tensor, temperature: float, vocab: int):
    """kd's re-tempering before issue 19: the tail spread evenly over the V − K uncached ids."""
    valid = torch.isfinite(logp).sum(dim=1)
    log_tail_ids = torch.log((vocab - valid).clamp(min=1).to(logp.dtype))
    logp = logp / temperature
    tail = (tail - log_tail_ids) / temperature + log_tail_ids
    norm = torch.logsumexp(torch.cat([logp, tail[:, None]], dim=1), dim=1, keepdim=True)
    return logp - norm, tail - norm[:, 0]


def bucket_kl(exact_lp, exact_tail, lp, tail) -> torch.Tensor:
    """KL(exact ‖ target) over K + 1 buckets, per row (fp64; 0·log 0 = 0)."""
    a = torch.cat([exact_lp, exact_tail[:, None]], dim=1)
    b = torch.cat([lp, tail[:, None]], dim=1)
    terms = torch.where(torch.isfinite(a), a.exp() * (a - b.clamp(min=-1e3)), torch.zeros_like(a))
    return terms.sum(dim=1)


def exact_buckets(z: torch.Tensor, ids: torch.Tensor, temperature: float):
    """softmax(z/T) at the cached ids and summed over the rest (fp64)."""
    logp = F.log_softmax(z / temperature, dim=-1)
    return logp.gather(1, ids), torch.logsumexp(logp.scatter(1, ids, float("-inf")), dim=-1)


def sqrt8_row_kl(z: torch.Tensor, k: int) -> torch.Tensor:
    """KL(exact T=1 buckets ‖ the sqrt8 cache's) per row, top-k of logits z (fp64)."""
    ids, lp, tail = topk_with_tail(z.clone(), k)
    lp64, tail64 = lp.double(), tail.double()
    stored_tail = fmt.decode_tail(fmt.encode_tail(tail.float().numpy(), "sqrt8"), "sqrt8")
    decoded = fmt.decode_topk_values(
        fmt.encode_topk_values(lp.float().numpy(), "sqrt8"), "sqrt8", tail_logprobs=stored_tail
    )
    got_lp, got_tail = retemper_sparse(torch.from_numpy(decoded).double(), torch.from_numpy(stored_tail).double(), 1.0)
    return bucket_kl(lp64, tail64, got_lp, got_tail)


def adversarial_sqrt8_kl(k: int) -> float:
    """The worst row for sqrt8: every sqrt p just under half a step, rounding alternately up and down."""
    half = math.floor(fmt.SQRT_LEVELS / math.sqrt(k) - 0.5) + 0.5  # largest m + 1/2 with k·((m+½)/180)² <= 1
    eps = 1e-6
    u = np.where(np.arange(k) % 2 == 0, half - eps, half + eps) / fmt.SQRT_LEVELS
    p = u**2
    tail = max(1.0 - p.sum(), 0.0)
    lp = np.log(p)[None, :]
    tail_lp = np.array([np.log(tail) if tail > 0 else -np.inf])
    stored_tail = fmt.decode_tail(fmt.encode_tail(tail_lp, "sqrt8"), "sqrt8")
    decoded = fmt.decode_topk_values(fmt.encode_topk_values(lp, "sqrt8"), "sqrt8", tail_logprobs=stored_tail)
    got_lp, got_tail = retemper_sparse(torch.from_numpy(decoded).double(), torch.from_numpy(stored_tail).double(), 1.0)
    return float(bucket_kl(torch.from_numpy(lp), torch.from_numpy(tail_lp), got_lp, got_tail)[0])


def summary(values: list[torch.Tensor]) -> dict[str, float]:
    v = torch.cat(values)
    return {"mean": float(v.mean()), "max": float(v.max()), "tokens": int(v.numel())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--data", type=Path, default=None, help="GSM8K train.jsonl [default: ../shared/data/gsm8k]")
    args = parser.parse_args()
    data = args.data or require_gsm8k() / "train.jsonl"
    work = WORK / "tempered_tail"
    work.mkdir(parents=True, exist_ok=True)
    teacher_dir = gguf_to_hf_dir(embedded_gguf_path())
    common = ["--teacher", str(teacher_dir), "--data", str(data), "--limit", str(args.rows), "--top-k", "64"]
    caches = {
        "plain": [],
        "tempered": ["--temperatures", "0.5,1,2,4", "--value-encoding", "sqrt8"],
        "tempered-q64": ["--temperatures", "0.5,1,2,4", "--value-encoding", "q64"],
        "tempered-float32": ["--temperatures", "0.5,1,2,4", "--value-encoding", "float32"],
    }
    for name, flags in caches.items():
        out = work / name
        run_step(["cache-logits", *common, "--out", str(out), *flags, "--json"], work / f"{name}.json")

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), torch_dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    encodings = {"sqrt8": "tempered", "q64": "tempered-q64", "float32": "tempered-float32"}
    kl = {
        f"{when}_T{t:g}": []
        for t in TEMPERATURES
        for when in (*(f"before_{e}" for e in encodings), *(f"after_{e}" for e in encodings))
    }
    sqrt8 = {k: [] for k in SQRT8_KS}
    streams = [CacheReader(work / name).iter_sequences() for name in encodings.values()]
    for seq, *others in zip(*streams, strict=True):
        positions = fmt.target_positions(seq.loss_mask)
        with torch.inference_mode():
            logits = model(torch.from_numpy(seq.input_ids.astype(np.int64))[None]).logits[0]
        z = logits[torch.from_numpy(positions - 1)].double()
        for k in SQRT8_KS:
            sqrt8[k].append(sqrt8_row_kl(z.float(), k))
        for encoding, s in zip(encodings, (seq, *others), strict=True):
            teacher = s.teacher
            ids = torch.from_numpy(teacher.ids.astype(np.int64))
            lp = torch.from_numpy(teacher.logprobs).double()
            tail = torch.from_numpy(teacher.tail).double()
            for t in TEMPERATURES:
                exact_lp, exact_tail = exact_buckets(z, ids, t)
                m = teacher.temperatures.index(t)
                got = retemper_sparse(lp, tail, t, torch.from_numpy(teacher.tempered_tails[:, m]).double())
                kl[f"after_{encoding}_T{t:g}"].append(bucket_kl(exact_lp, exact_tail, *got))
                kl[f"before_{encoding}_T{t:g}"].append(
                    bucket_kl(exact_lp, exact_tail, *old_retemper(lp, tail, t, vocab))
                )

    sizes = {}
    for name in caches:
        reader = CacheReader(work / name)
        sizes[name] = {
            "bytes_per_target_token": sum(s["bytes"] for s in reader.shards) / sum(s["targets"] for s in reader.shards),
            "by_part": bytes_breakdown(reader, None),
        }
    inspect = subprocess.run(
        [sys.executable, "-m", "kd.cli", "inspect", str(work / "tempered")],
        capture_output=True,
        text=True,
        env=kd_env(),
        cwd=REPO,
    ).stderr  # kd inspect's table goes to its console (stderr)
    results = {
        "rows": args.rows,
        "k": 64,
        "kl_exact_vs_target": {name: summary(v) for name, v in kl.items()},
        "sqrt8_kl_T1": {
            str(k): {
                **summary(v),
                "bound_2k_over_360sq": fmt.sqrt8_kl_bound(k),
                "adversarial_row": adversarial_sqrt8_kl(k),
            }
            for k, v in sqrt8.items()
        },
        "bytes": sizes,
        "tempered_tail_bytes_per_target_token": {
            "sqrt8_3_temperatures": sizes["tempered"]["bytes_per_target_token"]
            - sizes["plain"]["bytes_per_target_token"],
        },
        "inspect": inspect,
    }
    print(json.dumps({k: v for k, v in results.items() if k != "inspect"}, indent=2))
    print(inspect)
    write_results("tempered_tail", results)


if __name__ == "__main__":
    main()
