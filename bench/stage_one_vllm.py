"""Stage one's engines against vLLM's own speed (issue 10), and vLLM post-processing alone.

    .venv/bin/python bench/stage_one_vllm.py [--rows 200] [--top-k 64] [--rounds 2]

One process, the embedded SmolLM2-135M-Instruct teacher (or --teacher), the first --rows GSM8K train
problems tokenized as stage one tokenizes them. Modes, interleaved round by round:

- ``vllm_own``: vLLM's prompt-only throughput, `LLM.generate` of all sequences in one call,
  `max_tokens=1`, no log-probs (the ceiling the issue measures against);
- ``vllm_own_logprobs``: the same call asking vLLM only for each prompt token's own log-prob
  (`prompt_logprobs=0`): vLLM then applies its head, log-softmax and rank at every prompt position,
  the least any prompt-log-prob scorer on this engine can make it do;
- ``vllm_own_hidden``: vLLM's pooling runner returning every position's hidden state
  (`LLM.encode`, `token_embed`), all sequences in one call: what kd's hidden scoring gets from vLLM;
- ``kd_vllm``: kd's vLLM engine as `kd cache-logits --engine vllm` runs it by default
  (`--vllm-scoring hidden`: the pooling runner, then kd's head at target positions only);
- ``kd_vllm_logprobs``: kd's vLLM engine with `--vllm-scoring logprobs` (prompt top-k log-probs,
  flat output, vectorised conversion of the target positions);
- ``kd_transformers``: kd's transformers engine over the same sequences in length-sorted batches
  (`--batch-size 8`, as `kd cache-logits` feeds it), fp32 on CPU.

Tokens/s counts every token of every sequence. ``postprocess`` times `topk_from_flat` alone on
the outputs of one flat-log-prob `generate`: target positions converted per second, one core.
Two vLLM engines (generate and pooling runners) live side by side, idle when not timed.
`LLM(...)` spawns processes, hence the `__main__` guard.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from common import require_gsm8k, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    gsm8k = require_gsm8k()

    from vllm import PoolingParams, SamplingParams

    from kd.pipeline.capture.plan import length_sorted_batches
    from kd.pipeline.data import encode_examples, iter_examples
    from kd.pipeline.engines.logits_hf import TransformersTeacher
    from kd.pipeline.engines.logits_vllm import VllmTeacher, topk_from_flat
    from kd.pipeline.engines.teacher import SequenceToScore, TargetSpec
    from kd.pipeline.models import load_tokenizer, resolve_model

    source = resolve_model(args.teacher, "--teacher")
    tokenizer = load_tokenizer(source)
    examples = list(iter_examples(gsm8k / "train.jsonl", limit=args.rows))
    seqs = [
        SequenceToScore(i, e.input_ids, e.loss_mask)
        for i, e in enumerate(encode_examples(examples, tokenizer, 2048))
        if e is not None
    ]
    tokens = sum(len(s.input_ids) for s in seqs)
    targets = sum(int(s.loss_mask[1:].sum()) for s in seqs)
    spec = TargetSpec("topk", k=args.top_k)
    kd_vllm_lp = VllmTeacher(source, spec, dtype="auto", max_model_len=2049, scoring="logprobs")
    kd_vllm = VllmTeacher(source, spec, dtype="auto", max_model_len=2049, scoring="hidden")
    hf = TransformersTeacher(source, spec, device="cpu", dtype="auto")
    prompts = [{"prompt_token_ids": s.input_ids.tolist()} for s in seqs]

    def vllm_own() -> None:
        kd_vllm_lp.llm.generate(prompts, SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)

    def vllm_own_logprobs() -> None:
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        kd_vllm_lp.llm.generate(prompts, params, use_tqdm=False)

    def vllm_own_hidden() -> None:
        params = PoolingParams(task="token_embed", use_activation=False)
        kd_vllm.llm.encode(prompts, params, pooling_task="token_embed", use_tqdm=False)

    def kd_vllm_score() -> None:
        kd_vllm.score(seqs)

    def kd_vllm_logprobs() -> None:
        kd_vllm_lp.score(seqs)

    def kd_transformers() -> None:
        for batch in length_sorted_batches(seqs, 8):
            hf.score([seqs[i] for i in batch])

    modes = {
        "vllm_own": vllm_own,
        "vllm_own_logprobs": vllm_own_logprobs,
        "vllm_own_hidden": vllm_own_hidden,
        "kd_vllm": kd_vllm_score,
        "kd_vllm_logprobs": kd_vllm_logprobs,
        "kd_transformers": kd_transformers,
    }
    kd_vllm_lp.llm.generate(prompts[:16], SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)  # warm-up
    kd_vllm.score(seqs[:16])
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, fn in modes.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            print(f"{name:16} {tokens / times[name][-1]:8.1f} tok/s", flush=True)

    # Post-processing alone: one flat-log-prob generate, then only kd's conversion, timed.
    outputs = kd_vllm_lp.llm.generate(prompts, kd_vllm_lp.sampling_params(), use_tqdm=False)
    post = []
    for _ in range(5):
        t0 = time.perf_counter()
        for output, seq in zip(outputs, seqs, strict=True):
            topk_from_flat(output.prompt_logprobs, seq.loss_mask, args.top_k)
        post.append(time.perf_counter() - t0)

    median = {name: statistics.median(t) for name, t in times.items()}
    per_round = [
        {
            "kd_vllm/vllm_own": times["vllm_own"][r] / times["kd_vllm"][r],
            "kd_vllm_logprobs/vllm_own": times["vllm_own"][r] / times["kd_vllm_logprobs"][r],
            "kd_vllm_logprobs/vllm_own_logprobs": times["vllm_own_logprobs"][r] / times["kd_vllm_logprobs"][r],
            "kd_vllm/vllm_own_hidden": times["vllm_own_hidden"][r] / times["kd_vllm"][r],
            "kd_transformers/vllm_own": times["vllm_own"][r] / times["kd_transformers"][r],
            "kd_vllm/kd_transformers": times["kd_transformers"][r] / times["kd_vllm"][r],
        }
        for r in range(args.rounds)
    ]
    result = {
        "teacher": source.display_name,
        "rows": len(seqs),
        "tokens": tokens,
        "target_tokens": targets,
        "top_k": args.top_k,
        "seconds_median": median,
        "tokens_per_second": {name: tokens / s for name, s in median.items()},
        "ratio_kd_vllm_to_vllm_own": median["vllm_own"] / median["kd_vllm"],
        "ratio_kd_vllm_to_kd_transformers": median["kd_transformers"] / median["kd_vllm"],
        "ratio_kd_vllm_logprobs_to_vllm_own": median["vllm_own"] / median["kd_vllm_logprobs"],
        "ratio_kd_vllm_logprobs_to_vllm_own_logprobs": median["vllm_own_logprobs"] / median["kd_vllm_logprobs"],
        "ratio_kd_vllm_to_vllm_own_hidden": median["vllm_own_hidden"] / median["kd_vllm"],
        "ratio_kd_transformers_to_vllm_own": median["vllm_own"] / median["kd_transformers"],
        "per_round": per_round,
        "postprocess_positions_per_second": targets / statistics.median(post),
        "rounds": times,
    }
    write_results("stage_one_vllm", result)
    print(json_line(result))


def json_line(result: dict) -> str:
    return (
        f"kd vLLM (hidden) / vLLM own = {result['ratio_kd_vllm_to_vllm_own']:.3f}; kd vLLM (logprobs) / vLLM own "
        f"= {result['ratio_kd_vllm_logprobs_to_vllm_own']:.3f}; kd vLLM (logprobs) / vLLM own with prompt log-probs = "
        f"{result['ratio_kd_vllm_logprobs_to_vllm_own_logprobs']:.3f}; kd vLLM / kd transformers = "
        f"{result['ratio_kd_vllm_to_kd_transformers']:.3f}; post-processing "
        f"{result['postprocess_positions_per_second']:,.0f} target positions/s; per round {result['per_round']}"
    )


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
