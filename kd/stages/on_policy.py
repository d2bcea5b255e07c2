"""`kd on-policy`: distil on the student's own samples, in rounds, with the teacher as a batch job.

kd on-policy --prompts gsm8k.jsonl --student-from-teacher --layers even:8 --out run/ --rounds 4
kd on-policy --teacher T/ --student S/ --prompts p.jsonl --out run/ --engine vllm --teacher-engine vllm
kd on-policy ... --mix 0.25 --mix-data traces.jsonl      # a quarter of each round off-policy (GKD's lambda)
kd on-policy --teacher T/ --student S/ ... --cross-tokenizer  # T's tokenizer differs: samples scored as text

Rerunning the same command resumes a killed run; other settings into the same --out are refused.
Every flag is a field of kd.pipeline.onpolicy.OnPolicyConfig (see kd/stages/options.py).
"""

from __future__ import annotations

import json
from typing import Any

import typer

from kd.pipeline.onpolicy import OnPolicyConfig, run_on_policy
from kd.pipeline.progress import log
from kd.stages.cache_logits import stdout_to_stderr
from kd.stages.gen_traces import read_template
from kd.stages.options import CommonSwitches, config_command, write_config


def _prepare(values: dict[str, Any], given: set[str]) -> dict[str, Any]:
    return {**values, "template": read_template(values["template"])}


def run(cfg: OnPolicyConfig, switches: CommonSwitches) -> None:
    if switches.as_json:
        # vLLM logs to stdout (and its workers inherit fd 1): --json's stdout must hold only the summary.
        with stdout_to_stderr() as real_stdout:
            summary = _run(cfg)
        real_stdout.write(json.dumps(summary) + "\n")
        real_stdout.close()
        return
    summary = _run(cfg)
    last = summary["rounds"][-1]
    log(
        f"[green]{len(summary['rounds'])} rounds, {summary['steps']} steps; last round's samples: reverse KL "
        f"{last.get('reverse_kl', float('nan')):.4f} to the teacher; student: {summary['student']}[/green]"
    )


def _run(cfg: OnPolicyConfig) -> dict[str, Any]:
    summary = run_on_policy(cfg)
    write_config(cfg.out, cfg)  # after the run's own checks: `kd on-policy --config OUT/config.yaml` reruns it
    return summary


def register(app: typer.Typer) -> None:
    config_command(
        app,
        "on-policy",
        OnPolicyConfig,
        run,
        doc="On-policy distillation in rounds: the student samples, the teacher scores (a cache), the student trains.",
        prepare=_prepare,
    )
