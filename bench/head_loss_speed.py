"""Head + loss alone: forward and backward of one [1024 × 49,152] logits chunk, KD against CE (issue 11).

    .venv/bin/python bench/head_loss_speed.py [--tokens 1024] [--vocab 49152] [--hidden 576] [--rounds 7]

SmolLM2 sizes with random weights (no model, no data): hidden[N, H] and the head weight[V, H] in
fp32, both requiring gradients, one chunk of N target tokens. Each mode is one call of the loss
plus .backward(): the head's forward matmul, the loss and its gradient, and the two backward
matmuls (grad_hidden = g @ W, grad_W = g.T @ h). Modes, interleaved round by round:

- ``matmuls``: the head's three matmuls alone (the floor every mode pays);
- ``ce``: CE only (α = 1, no teacher), the fused head — what a CE-only step runs;
- ``top64``: α = 0.5, forward KL over a top-64 + tail teacher, fused (T = 1; ``top64_t2`` at T = 2);
- ``rs``: α = 0.5, RS-KD from 64 draws, fused;
- ``*_autograd``: the same through the pre-fused autograd path (`autograd_chunk_loss`), for comparison.

Ratios are KD ÷ ``ce`` of the same run, medians over rounds (the machine is shared: read ratios,
not seconds).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import write_results

from kd.losses import (
    LossConfig,
    SampledTeacher,
    SparseTeacher,
    autograd_chunk_loss,
    fused_chunk_loss,
    head_loss_sum,
)


def make_teachers(
    tokens: int, vocab: int, k: int, draws: int, seed: int, device: str | torch.device = "cpu"
) -> tuple[SparseTeacher, SampledTeacher]:
    """A top-k + tail teacher and an RS teacher (unique ids of `draws` samples with counts) from random logits.

    Made on `device`: at a 150K vocabulary the [tokens, vocab] temporaries take seconds on a GPU, minutes on a CPU.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    logp = torch.log_softmax(torch.randn(tokens, vocab, generator=g, device=device) * 3.0, dim=1)
    values, ids = logp.topk(k, dim=1)
    tail = torch.log1p(-values.exp().sum(dim=1).clamp(max=1 - 1e-6))
    # The exact tail of softmax(z/2) outside the top-k, as `kd cache-logits --temperatures 1,2` records it:
    # a T = 2 loss on a top-k cache without it is refused (kd/losses/divergences.py).
    tempered = torch.log_softmax(logp / 2.0, dim=1).scatter(1, ids, float("-inf"))
    tail_t2 = torch.logsumexp(tempered, dim=1, keepdim=True)
    del tempered
    top = SparseTeacher(ids, values, tail, tail_t2, (2.0,))
    samples = torch.multinomial(logp.exp(), draws, replacement=True, generator=g)
    del logp
    counts = torch.zeros(tokens, vocab, device=device).scatter_add_(
        1, samples, torch.ones(tokens, draws, device=device)
    )
    width = int((counts > 0).sum(dim=1).max())
    rs_counts, rs_ids = counts.topk(width, dim=1)  # zero counts pad a row
    return top, SampledTeacher(rs_ids, rs_counts, draws)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    top, rs = make_teachers(args.tokens, args.vocab, args.top_k, 64, args.seed)
    chunk = args.tokens
    ce_only = LossConfig(alpha=1.0, chunk_size=chunk)
    kd = LossConfig(alpha=0.5, chunk_size=chunk)
    kd_t2 = LossConfig(alpha=0.5, temperature=2.0, chunk_size=chunk)

    def loss(teacher, config, chunk_loss):
        return lambda: head_loss_sum(hidden, weight, None, labels, teacher, config, None, chunk_loss).total

    def matmuls():
        logits = F.linear(hidden.detach(), weight.detach())
        _ = logits @ weight.detach(), logits.t() @ hidden.detach()
        return None

    modes = {
        "matmuls": matmuls,
        "ce": loss(None, ce_only, fused_chunk_loss),
        "top64": loss(top, kd, fused_chunk_loss),
        "top64_t2": loss(top, kd_t2, fused_chunk_loss),
        "rs": loss(rs, kd, fused_chunk_loss),
        "ce_autograd": loss(None, ce_only, autograd_chunk_loss),
        "top64_autograd": loss(top, kd, autograd_chunk_loss),
        "rs_autograd": loss(rs, kd, autograd_chunk_loss),
    }

    def run(fn) -> float:
        t0 = time.perf_counter()
        total = fn()
        if total is not None:
            total.backward()
        seconds = time.perf_counter() - t0
        hidden.grad = weight.grad = None
        return seconds

    for fn in modes.values():  # warm-up
        run(fn)
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode, fn in modes.items():
            seconds[mode].append(run(fn))
    median = {m: float(np.median(s)) for m, s in seconds.items()}
    # Per-round ratios too: a round's modes ran back to back, so they share the machine's load.
    per_round = {m: float(np.median([a / c for a, c in zip(seconds[m], seconds["ce"], strict=True)])) for m in modes}
    result = {
        "tokens": args.tokens,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "top_k": args.top_k,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "seconds_median": median,
        "ratio_to_ce_of_medians": {m: median[m] / median["ce"] for m in modes},
        "ratio_to_ce_median_per_round": per_round,
        "ratio_autograd_ce_to_fused_ce": median["ce_autograd"] / median["ce"],
        "seconds": seconds,
    }
    write_results("head_loss_speed" + (f"_threads{args.threads}" if args.threads else ""), result)
    for mode in modes:
        ratio = median[mode] / median["ce"]
        print(f"{mode:16} {median[mode]:.3f} s   ÷ ce {ratio:.3f}   per round {per_round[mode]:.3f}")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("ratio_autograd")}, indent=1))


if __name__ == "__main__":
    main()
