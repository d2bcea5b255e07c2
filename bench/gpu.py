"""Every GPU row of BENCHMARKS.md in one command, on random-weight models of real shapes (issue 21, item 4).

    python3 bench/gpu.py [--out DIR] [--budget-s 480] [--peak-tflops 989] [--rounds 7] [--parts stage_one,head,step]
    .venv/bin/python bench/gpu.py --smoke            # tiny sizes, CPU, seconds (tests/test_gpu_smoke.py)
    .venv/bin/python bench/gpu.py --preset medium    # CPU rehearsal of the full run's structure (~1-2 min)

No network and no downloads: the teacher and student are built from configs with random weights
(speed and memory do not depend on the values) and the token sequences are synthetic. Parts, each
with its modes interleaved round by round (medians over rounds, as the CPU benchmarks do):

1. **Stage one**: a Llama-3.2-1B-shaped teacher (hidden 2048, 16 layers, 32 heads, 8 KV heads,
   intermediate 8192, vocabulary 128,256, bf16 on CUDA) through kd's transformers engine
   (`TransformersTeacher.score`: decoder body, head at target positions only, top-64 + tail, results
   copied to the host) against the plain forward (`model(ids).logits`, head everywhere). Tokens/s and
   the share of peak bf16 FLOP/s (useful FLOPs: 2 × body parameters per token, causal attention
   2·s²·hidden per layer and sequence, 2 × hidden × vocab per head row). Shards are not written
   (the writer is timed on CPU by stage_one_speed.py).
2. **Head + loss alone**: one [tokens × 151,936] head (hidden 2048) through `head_loss_sum` with
   `fused_chunk_loss`, bf16 autocast: CE only, top-64 + tail KD + CE, RS-KD (64 draws) + CE, and the
   three matmuls alone; time and peak memory above the inputs, ÷ CE.
3. **Full step**: a 1B-shaped student (the teacher's body, vocabulary 151,936, fp32 master weights,
   bf16 autocast, AdamW) doing what `kd train`'s step does (body → hidden states at targets →
   `distill_loss_sum` → backward ÷ target count → clip → AdamW): CE only, cached top-64, cached RS-64,
   online KD (a bf16 teacher of the student's shape, full vocabulary). Step time, tokens/s and
   `torch.cuda.max_memory_allocated` per mode (reset before each; the online teacher's weights, resident
   throughout, counted for online KD only), ÷ CE, and the peak above weights + AdamW state, ÷ CE.
4. **Hidden-cache KD step** (part of 3, interleaved with its modes): KD from a bf16 hidden-state cache,
   the teacher's final hidden states at the targets (computed once by the teacher's body, rounded to
   bf16 and decoded to fp32 as a cache's rows are) through the teacher's head inside the fused loss:
   full vocabulary, exact. Its goal, from issue 22: ≤ 1 + the teacher head's FLOPs ÷ the student
   step's (2·targets·hidden·vocab ÷ 6·parameters·tokens), stated beside the ratio.

A global deadline (`--budget-s`, counted from the start of the script) bounds the whole run: each
part also has its own cap (setup included), stops taking rounds at 80% of it or at the deadline (its
warm-up and first round always run), and a part with under a quarter of its cap left is skipped
with a note. A part that raises (out of memory, say) is noted and the others still run. The JSON
and table are rewritten after each part, so a run stopped by `timeout` keeps what it measured.

Writes DIR/gpu.json (every row, sizes, per-round figures, machine) and DIR/gpu.md (the table) and
prints the table. On a CPU (the smoke mode) timings are fp32 and memory is the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # measure the kd beside this script, installed or not

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine  # noqa: E402
from head_loss_speed import make_teachers  # noqa: E402

from kd.cache.format import target_positions  # noqa: E402
from kd.losses import LossConfig, distill_loss_sum, fused_chunk_loss, head_loss_sum  # noqa: E402
from kd.losses.signals import DenseTeacher  # noqa: E402
from kd.pipeline.engines.logits_hf import TransformersTeacher  # noqa: E402
from kd.pipeline.engines.teacher import SequenceToScore, TargetSpec  # noqa: E402
from kd.pipeline.heads import split_body_and_head  # noqa: E402
from kd.pipeline.models import ModelSource  # noqa: E402

PEAK_BF16_TFLOPS = {
    # Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity), matched in this order.
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
}
"""Nominal dense bf16 peak, TFLOP/s, by a substring of torch.cuda.get_device_name (--peak-tflops overrides)."""

LLAMA_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
}
"""Llama-3.2-1B's shape (its rope scaling aside, which changes no FLOPs)."""


@dataclass(frozen=True)
class Sizes:
    """What one preset runs."""

    teacher: dict
    """LlamaConfig fields of the stage-one teacher."""
    student_vocab: int
    """The student's vocabulary (its body is the teacher's shape)."""
    sequences: int
    """Synthetic sequences scored per stage-one round."""
    min_len: int
    max_len: int
    prompt_share: float
    """Leading share of each sequence that is prompt (no targets); the rest are targets."""
    batch_tokens: int
    """Stage one: padded tokens per length-sorted batch (kd cache-logits --batch-tokens)."""
    head_tokens: int
    """Target tokens of the head + loss part."""
    step_batch: int
    step_len: int
    steps_per_round: int
    rounds: int
    top_k: int = 64
    draws: int = 64
    chunk_size: int = 1024
    """LossConfig.chunk_size (kd train's --chunk-size default)."""
    caps: dict = field(default_factory=dict)
    """Seconds each part may take at most (its setup included)."""


PRESETS = {
    "full": Sizes(
        teacher=LLAMA_1B,
        student_vocab=151936,
        sequences=192,
        min_len=256,
        max_len=1536,
        prompt_share=0.4,
        batch_tokens=32768,
        head_tokens=8192,
        step_batch=8,
        step_len=1024,
        steps_per_round=2,
        rounds=7,
        caps={"stage_one": 150, "head": 80, "step": 200},
    ),
    "medium": Sizes(
        teacher={
            **LLAMA_1B,
            "hidden_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 1024,
            "vocab_size": 32000,
        },
        student_vocab=49152,
        sequences=16,
        min_len=64,
        max_len=256,
        prompt_share=0.4,
        batch_tokens=1024,
        head_tokens=1024,
        step_batch=2,
        step_len=256,
        steps_per_round=1,
        rounds=3,
        caps={"stage_one": 40, "head": 40, "step": 60},
    ),
    "smoke": Sizes(
        teacher={
            **LLAMA_1B,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
            "vocab_size": 512,
        },
        student_vocab=600,
        sequences=8,
        min_len=16,
        max_len=48,
        prompt_share=0.4,
        batch_tokens=128,
        head_tokens=64,
        step_batch=2,
        step_len=32,
        steps_per_round=1,
        rounds=2,
        top_k=16,
        draws=16,
        chunk_size=32,
        caps={"stage_one": 30, "head": 30, "step": 30},
    ),
}


# ----------------------------------------------------------------------------- plumbing


class Clock:
    """The global deadline and each part's own: a part runs until min(its cap, the global end)."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.end = self.start + budget_s

    def left(self) -> float:
        return self.end - time.perf_counter()

    def part_end(self, cap_s: float) -> float:
        return min(time.perf_counter() + cap_s, self.end)


@dataclass
class Row:
    """One line of the table: a figure, or why there is none."""

    key: str
    label: str
    value: float | None
    unit: str
    note: str = ""
    status: str = "measured"
    """measured, skipped (time budget, --parts) or failed (the part raised; the note says what)."""
    goal: str = ""
    """The issue's goal for this figure and whether it is met, where BENCHMARKS.md states one."""


GOALS = {
    "stage_one_ratio_to_forward": ("≥ 0.9", lambda v: v >= 0.9),  # issue 2
    "head_time_top64_to_ce": ("≤ 1.15", lambda v: v <= 1.15),  # issue 11
    "step_time_cached_top64_to_ce": ("≤ 1.05", lambda v: v <= 1.05),
    "step_time_cached_rs_to_ce": ("≤ 1.03", lambda v: v <= 1.03),
    "step_memory_cached_top64_to_ce": ("≤ 1.05", lambda v: v <= 1.05),
}
"""Row key -> (goal, test), the goals BENCHMARKS.md quotes for the same ratios on CPU."""


class Device:
    """Timing and memory on CUDA or CPU."""

    def __init__(self, name: str, dtype: str = "auto") -> None:
        self.name = name
        self.cuda = name.startswith("cuda")
        # bf16 autocast on CUDA, as kd train does; fp32 on CPU, where bf16 is ~25x slower here.
        self.amp = torch.bfloat16 if dtype in ("bf16", "bfloat16") or (dtype == "auto" and self.cuda) else None
        self.engine_dtype = "bfloat16" if self.amp else "float32"
        """The stage-one teacher's weights (kd cache-logits' --dtype auto: bf16 on CUDA)."""

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self):
        return torch.autocast(
            device_type="cuda" if self.cuda else "cpu", dtype=self.amp or torch.float32, enabled=self.amp is not None
        )

    def timed(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def memory(self, fn: Callable[[], object]) -> tuple[float, float]:
        """(peak bytes during fn, peak above what was allocated before it). CPU: peak RSS so far (coarse)."""
        if not self.cuda:
            fn()
            rss = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            return rss, rss
        self.sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated()
        return float(peak), float(peak - before)

    def free(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def interleaved(
    modes: dict[str, Callable[[], object]], dev: Device, rounds: int, until: float
) -> dict[str, list[float]]:
    """Seconds of each mode per round, modes back to back within a round; stops at `until` after >= 1 round."""
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        if r and time.perf_counter() >= until:
            break
        for mode, fn in modes.items():
            seconds[mode].append(dev.timed(fn))
    return seconds


def medians(seconds: dict[str, list[float]]) -> dict[str, float]:
    return {m: float(np.median(s)) for m, s in seconds.items()}


def per_round_ratio(seconds: dict[str, list[float]], mode: str, base: str) -> float:
    return float(np.median([a / b for a, b in zip(seconds[mode], seconds[base], strict=True)]))


def llama(fields: dict, vocab: int | None = None):
    from transformers import LlamaConfig

    config = LlamaConfig(**{**fields, **({"vocab_size": vocab} if vocab else {})})
    config.head_dim = config.hidden_size // config.num_attention_heads
    return config


def build_model(config, dev: Device, dtype: torch.dtype):
    """Random weights made on the device itself: a 1.5B model initialised on the host takes tens of seconds."""
    from transformers import AutoModelForCausalLM

    with torch.device(dev.name):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


# ----------------------------------------------------------------------------- parts


def matmul_peak(dev: Device, smoke: bool) -> float:
    """Measured TFLOP/s of a square matmul in the run's compute dtype: a ceiling beside the nominal peak."""
    n = 256 if smoke else 8192
    dtype = dev.amp or torch.float32
    a = torch.randn(n, n, device=dev.name, dtype=dtype)
    b = torch.randn(n, n, device=dev.name, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 10
    seconds = dev.timed(lambda: [a @ b for _ in range(reps)])
    return 2 * n**3 * reps / seconds / 1e12


def synthetic_sequences(sizes: Sizes, vocab: int, seed: int = 0) -> list[SequenceToScore]:
    """Random token ids; the first prompt_share of each sequence is prompt, the rest are targets."""
    rng = np.random.default_rng(seed)
    seqs = []
    for i in range(sizes.sequences):
        n = int(rng.integers(sizes.min_len, sizes.max_len + 1))
        ids = rng.integers(0, vocab, n, dtype=np.int64)
        mask = np.zeros(n, dtype=bool)
        mask[max(1, int(n * sizes.prompt_share)) :] = True
        seqs.append(SequenceToScore(i, ids, mask))
    return seqs


def token_batches(seqs: list[SequenceToScore], batch_tokens: int) -> list[list[SequenceToScore]]:
    """Length-sorted batches of at most batch_tokens padded tokens (what --batch-tokens does in stage one)."""
    batches: list[list[SequenceToScore]] = []
    current: list[SequenceToScore] = []
    for seq in sorted(seqs, key=lambda s: len(s.input_ids)):
        if current and (len(current) + 1) * len(seq.input_ids) > batch_tokens:
            batches.append(current)
            current = []
        current.append(seq)
    return batches + ([current] if current else [])


def useful_flops(config, body_params: int, lengths: list[int], head_rows: int) -> float:
    """Matmul FLOPs a forward needs: 2·params per token, causal attention 2·s²·hidden per layer, 2·H·V per head row."""
    tokens = sum(lengths)
    attention = sum(2 * s * s * config.hidden_size * config.num_hidden_layers for s in lengths)
    return 2.0 * body_params * tokens + attention + 2.0 * config.hidden_size * config.vocab_size * head_rows


def stage_one(sizes: Sizes, dev: Device, rounds: int, until: float) -> dict:
    """Teacher tokens/s: kd's transformers engine (top-k and RS) against the plain forward."""
    config = llama(sizes.teacher)
    with tempfile.TemporaryDirectory() as tmp:
        config.to_json_file(str(Path(tmp) / "config.json"))
        source = ModelSource("config", str(Path(tmp) / "config.json"), "llama-3.2-1b-shaped (random weights)")
        with torch.device(dev.name):  # the engine's own loader, building the weights on the device
            spec = TargetSpec("topk", k=sizes.top_k)
            engine = TransformersTeacher(source, spec, device=dev.name, dtype=dev.engine_dtype)
    model = engine.model
    seqs = synthetic_sequences(sizes, config.vocab_size)
    batches = token_batches(seqs, sizes.batch_tokens)
    lengths = [len(s.input_ids) for s in seqs]
    targets = sum(len(target_positions(s.loss_mask)) for s in seqs)
    embed = model.get_input_embeddings().weight
    body_params = sum(p.numel() for p in engine.body.parameters() if p is not embed)
    padded = [(len(b), max(len(s.input_ids) for s in b)) for b in batches]
    inputs = []
    for batch in batches:
        length = max(len(s.input_ids) for s in batch)
        ids = torch.zeros((len(batch), length), dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for b, s in enumerate(batch):
            ids[b, : len(s.input_ids)] = torch.from_numpy(s.input_ids)
            mask[b, : len(s.input_ids)] = 1
        inputs.append((ids, mask))

    @torch.inference_mode()
    def forward(limit: int | None = None) -> None:
        for ids, mask in inputs[:limit]:  # the host-to-device copy included, as in the engine
            _ = model(input_ids=ids.to(dev.name), attention_mask=mask.to(dev.name)).logits

    topk_spec, rs_spec = TargetSpec("topk", k=sizes.top_k), TargetSpec("rs", num_samples=sizes.draws)

    def score(spec: TargetSpec, limit: int | None = None) -> None:
        engine.spec = spec
        for batch in batches[:limit]:
            engine.score(batch)

    modes = {
        "forward": forward,
        "kd_topk": lambda: score(topk_spec),
        "kd_rs": lambda: score(rs_spec),
    }
    for warm in (lambda: forward(2), lambda: score(topk_spec, 2), lambda: score(rs_spec, 2)):
        warm()
    seconds = interleaved(modes, dev, rounds, until)
    median = medians(seconds)
    tokens = sum(lengths)
    flops = {
        "forward": useful_flops(config, body_params, lengths, tokens),
        "kd_topk": useful_flops(config, body_params, lengths, targets),
        "kd_rs": useful_flops(config, body_params, lengths, targets),
    }
    out = {
        "teacher": dict(sizes.teacher),
        "dtype": str(next(model.parameters()).dtype),
        "parameters": sum(p.numel() for p in model.parameters()),
        "sequences": len(seqs),
        "tokens": tokens,
        "target_tokens": targets,
        "batches": padded,
        "head_chunk_rows": engine.chunk_rows,
        "flops_per_round": flops,
        "seconds_median": median,
        "tokens_per_second": {m: tokens / s for m, s in median.items()},
        "tflops": {m: flops[m] / s / 1e12 for m, s in median.items()},
        "ratio_kd_topk_to_forward_per_round": 1 / per_round_ratio(seconds, "kd_topk", "forward"),
        "rounds": seconds,
    }
    return out


def head_alone(sizes: Sizes, dev: Device, rounds: int, until: float) -> dict:
    """One [tokens × V] head through kd's fused loss: time and memory of KD against CE."""
    hidden_size, vocab, n = sizes.teacher["hidden_size"], sizes.student_vocab, sizes.head_tokens
    g = torch.Generator(device=dev.name).manual_seed(0)
    hidden = torch.randn(n, hidden_size, generator=g, device=dev.name).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g, device=dev.name) / hidden_size**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g, device=dev.name)
    top, rs = make_teachers(n, vocab, sizes.top_k, sizes.draws, 0, dev.name)
    ce_config = LossConfig(alpha=1.0, chunk_size=sizes.chunk_size)
    kd_config = LossConfig(alpha=0.5, chunk_size=sizes.chunk_size)

    def loss(teacher, config):
        def run() -> None:
            with dev.autocast():
                total = head_loss_sum(hidden, weight, None, labels, teacher, config, None, fused_chunk_loss).total
            total.backward()
            hidden.grad = weight.grad = None

        return run

    def matmuls() -> None:
        with dev.autocast():  # the head's forward matmul and the two backward ones, nothing else
            logits = torch.nn.functional.linear(hidden.detach(), weight.detach())
            _ = logits @ weight.detach(), logits.t() @ hidden.detach()

    modes = {"matmuls": matmuls, "ce": loss(None, ce_config), "top64": loss(top, kd_config), "rs": loss(rs, kd_config)}
    for fn in modes.values():
        fn()
    seconds = interleaved(modes, dev, rounds, until)
    memory = {m: dev.memory(fn) for m, fn in modes.items()}
    median = medians(seconds)
    out = {
        "tokens": n,
        "hidden": hidden_size,
        "vocab": vocab,
        "chunk_size": sizes.chunk_size,
        "seconds_median": median,
        "ratio_to_ce": {m: median[m] / median["ce"] for m in modes},
        "ratio_to_ce_per_round": {m: per_round_ratio(seconds, m, "ce") for m in modes},
        "peak_bytes": {m: p for m, (p, _) in memory.items()},
        "peak_above_inputs_bytes": {m: a for m, (_, a) in memory.items()},
        "rounds": seconds,
    }
    return out


def full_step(sizes: Sizes, dev: Device, rounds: int, until: float) -> dict:
    """kd train's step on a 1B-shaped student: CE, cached top-64, cached RS, a bf16 hidden cache, online KD."""
    config = llama(sizes.teacher, sizes.student_vocab)
    student = build_model(config, dev, torch.float32).train()  # fp32 master weights, as build_student gives
    teacher = build_model(config, dev, dev.amp or torch.float32).eval().requires_grad_(False)
    body, head, _ = split_body_and_head(student)
    teacher_body, teacher_head, _ = split_body_and_head(teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))

    g = torch.Generator(device=dev.name).manual_seed(1)
    b, length = sizes.step_batch, sizes.step_len
    input_ids = torch.randint(0, config.vocab_size, (b, length), generator=g, device=dev.name)
    attention = torch.ones_like(input_ids)
    first = max(1, int(length * sizes.prompt_share))  # targets: positions first..length-1 of every row
    rows = torch.arange(b, device=dev.name).repeat_interleave(length - first)
    cols = torch.arange(first - 1, length - 1, device=dev.name).repeat(b)  # hidden at t-1 predicts t
    labels = input_ids[rows, cols + 1]
    n = int(labels.numel())
    top, rs = make_teachers(n, config.vocab_size, sizes.top_k, sizes.draws, 1, dev.name)
    ce_config = LossConfig(alpha=1.0, chunk_size=sizes.chunk_size)
    kd_config = LossConfig(alpha=0.5, chunk_size=sizes.chunk_size)
    with torch.no_grad(), dev.autocast():  # what a bf16 hidden cache hands stage two: states at targets
        states = teacher_body(input_ids=input_ids, attention_mask=attention).last_hidden_state[rows, cols]
    hidden_cache = DenseTeacher(
        teacher_hidden=states.to(torch.bfloat16).float(), teacher_head_weight=teacher_head.weight
    )

    def step(signal, loss_config: LossConfig, online: bool = False) -> Callable[[], None]:
        def run() -> None:
            with dev.autocast():
                h = body(input_ids=input_ids, attention_mask=attention).last_hidden_state[rows, cols]
                teacher_signal = signal
                if online:
                    with torch.no_grad():
                        th = teacher_body(input_ids=input_ids, attention_mask=attention).last_hidden_state[rows, cols]
                    teacher_signal = DenseTeacher(teacher_hidden=th, teacher_head_weight=teacher_head.weight)
                parts = distill_loss_sum(h, head.weight, head.bias, labels, teacher_signal, loss_config)
            (parts.total / n).backward()  # the trainer divides once by the global target count
            float(parts.total.detach())  # the trainer logs the sums every step: one sync, as there
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def steps() -> None:
            for _ in range(sizes.steps_per_round):
                run()

        return steps

    modes = {
        "ce": step(None, ce_config),
        "cached_top64": step(top, kd_config),
        "cached_rs": step(rs, kd_config),
        "cached_hidden": step(hidden_cache, kd_config),
        "online": step(None, kd_config, online=True),
    }
    for fn in modes.values():  # warm-up; also creates AdamW's state, so memory below is steady-state
        fn()
    seconds = interleaved(modes, dev, rounds, until)
    memory = {m: dev.memory(fn) for m, fn in modes.items()}
    if dev.cuda:  # the online teacher stays resident for every mode; only online KD needs its weights
        resident = sum(p.numel() * p.element_size() for p in teacher.parameters())
        memory = {m: (p - resident if m != "online" else p, a) for m, (p, a) in memory.items()}
    step_s = {m: s / sizes.steps_per_round for m, s in medians(seconds).items()}
    student_parameters = sum(p.numel() for p in student.parameters())
    head_flops = 2 * n * config.hidden_size * config.vocab_size  # the teacher head at every target
    out = {
        "student_parameters": student_parameters,
        "hidden_goal": 1 + head_flops / (6 * student_parameters * b * length),
        "vocab": config.vocab_size,
        "batch": [b, length],
        "target_tokens": n,
        "steps_per_round": sizes.steps_per_round,
        "step_seconds_median": step_s,
        "tokens_per_second": {m: b * length / s for m, s in step_s.items()},
        "ratio_to_ce": {m: step_s[m] / step_s["ce"] for m in modes},
        "ratio_to_ce_per_round": {m: per_round_ratio(seconds, m, "ce") for m in modes},
        "peak_bytes": {m: p for m, (p, _) in memory.items()},
        "peak_above_weights_bytes": {m: a for m, (_, a) in memory.items()},
        "rounds": seconds,
    }
    return out


# ----------------------------------------------------------------------------- rows


def rows_of(parts: dict, notes: dict, peak: dict, sizes: Sizes) -> list[Row]:
    """The table: one Row per GPU figure of BENCHMARKS.md, or a note saying why it is missing."""
    rows: list[Row] = []
    k, draws = sizes.top_k, sizes.draws
    step_modes = (
        ("cached_top64", f"cached top-{k}"),
        ("cached_rs", f"cached RS-{draws}"),
        ("cached_hidden", "bf16 hidden cache"),
        ("online", "online KD"),
    )

    def basis(part: str, d: dict) -> str:
        """What a part's figures were measured on, for the note column."""
        rounds = len(next(iter(d["rounds"].values())))
        if part == "stage_one":
            return (
                f"{d['sequences']} seqs, {d['tokens']:,} tokens ({d['target_tokens']:,} targets), "
                f"{len(d['batches'])} batches, {rounds} rounds"
            )
        if part == "head":
            return f"[{d['tokens']:,} × {d['vocab']:,}], hidden {d['hidden']}, chunk {d['chunk_size']}, {rounds} rounds"
        return (
            f"{d['student_parameters'] / 1e6:,.0f}M-parameter student, {d['batch'][0]} × {d['batch'][1]} tokens "
            f"({d['target_tokens']:,} targets), {rounds} rounds × {d['steps_per_round']} steps"
        )

    def add(part: str, key: str, label: str, unit: str, value: Callable[[dict], float]) -> None:
        data = parts.get(part)
        if data is None:
            note = notes.get(part, "not run")
            rows.append(Row(key, label, None, unit, note, "failed" if note.startswith("failed") else "skipped"))
        else:
            figure = float(value(data))
            goal = ""
            if key in GOALS:
                goal = f"{GOALS[key][0]} — {'met' if GOALS[key][1](figure) else 'not met'}"
            rows.append(Row(key, label, figure, unit, basis(part, data), goal=goal))

    nominal = peak["nominal_tflops"]
    add(
        "stage_one",
        "stage_one_tokens_per_second",
        f"stage one: kd teacher tokens/s (top-{k}, head at targets)",
        "tok/s",
        lambda d: d["tokens_per_second"]["kd_topk"],
    )
    add(
        "stage_one",
        "stage_one_forward_tokens_per_second",
        "stage one: plain forward tokens/s (head everywhere)",
        "tok/s",
        lambda d: d["tokens_per_second"]["forward"],
    )
    add(
        "stage_one",
        "stage_one_ratio_to_forward",
        "stage one: kd ÷ plain forward (tokens/s)",
        "ratio",
        lambda d: d["seconds_median"]["forward"] / d["seconds_median"]["kd_topk"],
    )
    add(
        "stage_one",
        "stage_one_rs_tokens_per_second",
        f"stage one: kd teacher tokens/s (RS, {draws} draws)",
        "tok/s",
        lambda d: d["tokens_per_second"]["kd_rs"],
    )
    add(
        "stage_one",
        "stage_one_tflops",
        f"stage one: kd useful TFLOP/s (top-{k})",
        "TFLOP/s",
        lambda d: d["tflops"]["kd_topk"],
    )
    add(
        "stage_one",
        "stage_one_share_of_peak",
        f"stage one: kd share of peak bf16 ({nominal:.4g} TFLOP/s, {peak['source']})",
        "share",
        lambda d: d["tflops"]["kd_topk"] / nominal,
    )
    add(
        "stage_one",
        "stage_one_share_of_matmul",
        f"stage one: kd share of a measured matmul ({peak['measured_tflops']:.4g} TFLOP/s)",
        "share",
        lambda d: d["tflops"]["kd_topk"] / peak["measured_tflops"],
    )
    for mode, label in (("top64", f"top-{k} KD + CE"), ("rs", f"RS-{draws} KD + CE"), ("matmuls", "the three matmuls")):
        add(
            "head",
            f"head_time_{mode}_to_ce",
            f"head + loss: {label} ÷ CE (time)",
            "ratio",
            lambda d, m=mode: d["ratio_to_ce"][m],
        )
    for mode, label in (("top64", f"top-{k} KD + CE"), ("rs", f"RS-{draws} KD + CE")):
        add(
            "head",
            f"head_memory_{mode}_to_ce",
            f"head + loss: {label} ÷ CE (peak memory above inputs)",
            "ratio",
            lambda d, m=mode: d["peak_above_inputs_bytes"][m] / d["peak_above_inputs_bytes"]["ce"],
        )
    add("step", "step_ce_seconds", "full step: CE only (s per step)", "s", lambda d: d["step_seconds_median"]["ce"])
    add(
        "step",
        "step_ce_tokens_per_second",
        "full step: CE only tokens/s",
        "tok/s",
        lambda d: d["tokens_per_second"]["ce"],
    )
    for mode, label in step_modes:
        add(
            "step",
            f"step_time_{mode}_to_ce",
            f"full step: {label} ÷ CE (time)",
            "ratio",
            lambda d, m=mode: d["ratio_to_ce"][m],
        )
    for mode, label in step_modes:
        add(
            "step",
            f"step_memory_{mode}_to_ce",
            f"full step: {label} ÷ CE (peak memory)",
            "ratio",
            lambda d, m=mode: d["peak_bytes"][m] / d["peak_bytes"]["ce"],
        )
        add(
            "step",
            f"step_memory_above_weights_{mode}_to_ce",
            f"full step: {label} ÷ CE (peak above weights + AdamW)",
            "ratio",
            lambda d, m=mode: d["peak_above_weights_bytes"][m] / d["peak_above_weights_bytes"]["ce"],
        )
    add("step", "step_ce_peak_gib", "full step: CE only peak memory", "GiB", lambda d: d["peak_bytes"]["ce"] / 2**30)
    if "step" in parts:  # the hidden cache's goal depends on the shapes: 1 + head FLOPs / step FLOPs
        goal = parts["step"]["hidden_goal"]
        for row in rows:
            if row.key == "step_time_cached_hidden_to_ce":
                row.goal = f"≤ {goal:.3f} — {'met' if row.value <= goal else 'not met'}"
    return rows


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "", "| row | value | unit | goal | note |", "|---|---|---|---|---|"]
    for row in rows:
        if row.value is None:
            value = "—"
        elif row.unit in ("tok/s",):
            value = f"{row.value:,.0f}"
        else:
            value = f"{row.value:.3g}" if abs(row.value) < 100 else f"{row.value:,.1f}"
        lines.append(f"| {row.label} | {value} | {row.unit} | {row.goal} | {row.note or row.status} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps: CPU, seconds (the test suite)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="sizes (default: full; smoke)")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu.json and gpu.md")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "bfloat16", "float32"), help="auto: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="global deadline, seconds from the start")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per part (preset's default)")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="nominal dense bf16 peak (default: by GPU name)"
    )
    parser.add_argument("--parts", default="stage_one,head,step", help="comma-separated subset to run")
    args = parser.parse_args(argv)
    preset = "smoke" if args.smoke else (args.preset or "full")
    sizes = PRESETS[preset]
    clock = Clock(args.budget_s)
    dev = Device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), args.dtype)
    out_dir = args.out or (REPO / "bench" / ("results/gpu" if preset == "full" else f"out/gpu-{preset}"))
    rounds = args.rounds or sizes.rounds
    torch.manual_seed(0)

    gpu_name = torch.cuda.get_device_name(0) if dev.cuda else platform.processor() or "cpu"
    measured = matmul_peak(dev, preset != "full")
    if args.peak_tflops:
        nominal, source = args.peak_tflops, "--peak-tflops"
    else:
        match = next((k for k in PEAK_BF16_TFLOPS if dev.cuda and k in gpu_name), None)
        nominal, source = (PEAK_BF16_TFLOPS[match], f"{match} data sheet") if match else (measured, "measured matmul")
    peak = {"gpu": gpu_name, "nominal_tflops": nominal, "source": source, "measured_tflops": measured}
    print(f"{gpu_name}: peak {nominal:.4g} TFLOP/s ({source}); measured matmul {measured:.4g} TFLOP/s", flush=True)

    runners = {"stage_one": stage_one, "head": head_alone, "step": full_step}
    parts: dict[str, dict] = {}
    notes: dict[str, str] = {}
    wall: dict[str, float] = {}
    wanted = [p for p in args.parts.split(",") if p]

    def write() -> dict:
        """The JSON and the table as they stand: written after every part, so a killed run leaves what it had."""
        rows = rows_of(parts, notes, peak, sizes)
        header = (
            f"GPU rows: {gpu_name}, torch {torch.__version__}, preset {preset}, "
            f"{'bf16 autocast' if dev.amp else 'fp32'}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        )
        result = {
            "command": " ".join([Path(sys.executable).name, *(sys.argv if argv is None else ["bench/gpu.py", *argv])]),
            "machine": machine(),
            "preset": preset,
            "device": dev.name,
            "autocast": str(dev.amp) if dev.amp else "none (fp32)",
            "sizes": asdict(sizes),
            "peak": peak,
            "budget_s": args.budget_s,
            "part_wall_seconds": wall,
            "total_wall_seconds": time.perf_counter() - clock.start,
            "rows": [asdict(r) for r in rows],
            "parts": parts,
            "notes": notes,
            "table": markdown(rows, header),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu.json").write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
        (out_dir / "gpu.md").write_text(result["table"])
        return result

    for name, runner in runners.items():
        if name not in wanted:
            notes[name] = "not run (--parts)"
            continue
        cap = sizes.caps[name]
        if clock.left() < 0.25 * cap:  # not even a quarter of its cap left: a partial part would be noise
            notes[name] = f"skipped: global budget ({args.budget_s:g} s) spent"
            print(f"{name}: {notes[name]}", flush=True)
            continue
        t0 = time.perf_counter()
        # Setup and warm-up count against the part's cap; rounds stop at 80% of it (at least one round runs).
        until = clock.part_end(0.8 * cap)
        try:
            parts[name] = runner(sizes, dev, rounds, until)
        except Exception as exc:  # one call of a lent GPU must bring back the other parts: say why, go on
            traceback.print_exc()
            kind = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
            notes[name] = f"failed: {kind} ({str(exc).splitlines()[0][:160] if str(exc) else ''})"
        finally:
            dev.free()
        wall[name] = time.perf_counter() - t0
        taken = len(next(iter(parts[name]["rounds"].values()))) if name in parts else 0
        print(f"{name}: {wall[name]:.1f} s, {taken} rounds {notes.get(name, '')}", flush=True)
        write()

    result = write()
    print(result["table"])
    print(f"wrote {out_dir / 'gpu.json'} and gpu.md ({result['total_wall_seconds']:.1f} s)")
    return result


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    main()
