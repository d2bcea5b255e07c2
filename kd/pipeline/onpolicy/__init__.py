"""On-policy distillation in rounds (`kd on-policy`), and the teacher's verdict on any model's own samples.

    from kd.pipeline.onpolicy import OnPolicyConfig, run_on_policy
    run_on_policy(OnPolicyConfig(out="run/", prompts="gsm8k.jsonl", student_from_teacher=True, rounds=4))

Modules: `config` (settings), `plan` (each round's prompts and --mix records), `sampling` (the
student answers, through gen-traces' engines and ledger), `retokenize` (the samples in a teacher's
tokens, for --cross-tokenizer), `scoring` (stage one over the samples, and the judge's inputs),
`judge` (reverse KL and teacher log-likelihood of a student's own tokens), `state` (the run
directory: settings, lock), `run` (the rounds), `measure` (the same verdict for
`kd eval --on-policy-prompts`).

May import: every other wing (it composes sampling, capture and training) but never kd.stages.
"""

from kd.pipeline.onpolicy.config import OnPolicyConfig
from kd.pipeline.onpolicy.run import run_on_policy

__all__ = ["OnPolicyConfig", "run_on_policy"]
