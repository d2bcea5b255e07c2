"""`kd on-policy` as a library: rounds of (student samples -> teacher scores -> student trains).

    from kd.pipeline.onpolicy import OnPolicyConfig, run_on_policy
    run_on_policy(OnPolicyConfig(out="run/", prompts="gsm8k.jsonl", student_from_teacher=True))

Round r, in OUT/round-NNN/:

1. ``samples.jsonl``: the current student (round r−1's trained student, or the initial one) answers
   the round's prompts with gen-traces' engines (`sampling`);
2. ``cache/``: the teacher's top-k over exactly those sequences, by stage one's `run_cache_logits`
   (with --cross-tokenizer, over ``samples.teacher.jsonl``: the same samples as text in the teacher's
   tokens, `retokenize`; the cache is then in the teacher's tokenization, and steps 3 and 4 align it
   back to the student's tokenizer as `kd eval --cross-tokenizer` and `kd train --cross-tokenizer` do);
3. ``metrics.jsonl``: the teacher's verdict on the student's own samples, judged from that cache
   (`judge`), then the training summary;
4. ``train/``: `kd train --from-cache` as a library call, started from round r−1's checkpoint
   (weights, AdamW state, step count) with one cosine schedule spanning every round.

Each step's output is complete before the next starts, and each step resumes itself (the sample
ledger, the cache manifest, the trainer's checkpoints), so `kill -9` anywhere and a rerun of the
same command continues where it stopped; ``round.json`` marks a finished round.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from kd.cache.manifest import atomic_write_lines, atomic_write_text
from kd.errors import KdError
from kd.pipeline.capture import default_device
from kd.pipeline.data import corpus_fingerprint
from kd.pipeline.models import ModelSource, hf_dir_for, load_tokenizer, resolve_model, tokenizer_fingerprint
from kd.pipeline.models import weights_fingerprint as model_fingerprint
from kd.pipeline.onpolicy.config import OnPolicyConfig
from kd.pipeline.onpolicy.plan import MixSource, round_prompt_indices
from kd.pipeline.onpolicy.sampling import SamplerSettings, read_samples, sample_round, summarize_samples
from kd.pipeline.onpolicy.scoring import (
    ScoringSettings,
    cache_is_complete,
    judge_samples,
    score_samples,
    teacher_samples,
)
from kd.pipeline.onpolicy.state import RunDirectory, round_dir, settings_record
from kd.pipeline.progress import log
from kd.pipeline.traces.run import Prompt, load_prompts
from kd.pipeline.tracking import report_scalars
from kd.pipeline.training.checkpoint import checkpoint_dir, latest_checkpoint
from kd.pipeline.training.crosstok import Aligner
from kd.pipeline.training.trainer import TrainConfig, train

ROUND_DONE = "round.json"
INITIAL_STUDENT = "student-init"


def run_on_policy(cfg: OnPolicyConfig) -> dict[str, Any]:
    """Run (or resume) every round; returns the per-round metrics and the final student's path."""
    prompts = load_prompts(cfg.prompts)
    if cfg.prompts_per_round > len(prompts):
        raise KdError(f"--prompts-per-round {cfg.prompts_per_round} exceeds the {len(prompts)} prompts in --prompts")
    teacher = resolve_model(cfg.teacher, "--teacher")
    student = None if cfg.student_from_teacher else resolve_model(cfg.student, "--student")
    crossed = check_tokenizers(teacher, student, cfg.cross_tokenizer)  # (student's, teacher's) or None
    # In the student's tokens, as its samples are (samples.jsonl holds one tokenization); with one
    # tokenizer the teacher's directory is read, as before --cross-tokenizer existed (its chat template).
    mix = MixSource.load(cfg.mix_data, crossed[0] if crossed else load_tokenizer(teacher)) if cfg.mix else None
    device = cfg.device or default_device()
    fingerprints = {
        "teacher_fingerprint": model_fingerprint(teacher),
        "student_fingerprint": model_fingerprint(student) if student is not None else "from-teacher",
        "prompts_fingerprint": corpus_fingerprint(cfg.prompts),
    }
    if cfg.mix_data:
        fingerprints["mix_data_fingerprint"] = corpus_fingerprint(cfg.mix_data)

    out = Path(cfg.out)
    run_dir = RunDirectory(out)
    try:
        run_dir.check_settings(settings_record(cfg, fingerprints))
        initial = initial_student(out, cfg, teacher, student, device)
        steps = cfg.resolved_steps_per_round()
        rounds = []
        for index in range(cfg.rounds):
            rounds.append(run_round(cfg, index, prompts, mix, initial, steps, device, crossed))
            write_run_metrics(out, rounds)
            if index > 0:  # round index trained from round index-1's checkpoint; nothing else needs it
                shutil.rmtree(checkpoint_dir(round_dir(out, index - 1) / "train"), ignore_errors=True)
        final = round_dir(out, cfg.rounds - 1) / "train"
        link_final_student(out, final)
    finally:
        run_dir.close()
    return {"out": str(out), "student": str(out / "student"), "rounds": rounds, "steps": steps * cfg.rounds}


def student_tokenizer_source(teacher: ModelSource, student: ModelSource | None) -> ModelSource:
    """Where the student's tokenizer comes from: a student cut from the teacher, or a config without a
    tokenizer of its own, takes the teacher's."""
    if student is None:
        return teacher
    if student.kind == "config" and not (Path(student.path).parent / "tokenizer.json").is_file():
        return teacher
    return student


def check_tokenizers(
    teacher: ModelSource, student: ModelSource | None, cross_tokenizer: bool = False, flag: str = "--student"
) -> tuple[Any, Any] | None:
    """The (student's, teacher's) tokenizers where they differ, None where they are one.

    The teacher scores the student's own tokens only with one tokenizer: different ones are refused in
    one line, before anything is written, unless `cross_tokenizer` allows them (the samples are then
    scored as text, `retokenize`).
    """
    source = student_tokenizer_source(teacher, student)
    if source is teacher:
        return None
    teacher_tokenizer, student_tokenizer = load_tokenizer(teacher), load_tokenizer(source)
    teacher_id, student_id = tokenizer_fingerprint(teacher_tokenizer), tokenizer_fingerprint(student_tokenizer)
    if student_id == teacher_id:
        return None
    if not cross_tokenizer:
        raise KdError(
            f"{flag} {source.path} and --teacher {teacher.path} use different tokenizers "
            f"({student_id} vs {teacher_id}); pass --cross-tokenizer to score its samples as text"
        )
    return student_tokenizer, teacher_tokenizer


def initial_student(
    out: Path, cfg: OnPolicyConfig, teacher: ModelSource, student: ModelSource | None, device: str
) -> ModelSource:
    """The round-0 student as a Hugging Face directory the engines load.

    A pretrained HF directory is used where it is; a GGUF file is converted once (cached); a student
    cut from the teacher or initialised from a config is built once into OUT/student-init (written
    under a temporary name and renamed, so a kill leaves either all of it or nothing).
    """
    if student is not None and student.kind in ("hf_dir", "hub"):
        return student
    if student is not None and student.kind == "gguf":
        return ModelSource("hf_dir", hf_dir_for(student), student.display_name)
    target = out / INITIAL_STUDENT
    if not (target / "config.json").is_file():
        import torch

        from kd.pipeline.training.students import build_student

        torch.manual_seed(cfg.seed)
        model, source, layers = build_student(
            cfg.student, teacher if cfg.student_from_teacher else None, cfg.layers, "cpu"
        )
        tokenizer_source = student_tokenizer_source(teacher, source)  # a config's own tokenizer.json, if any
        tmp = Path(tempfile.mkdtemp(prefix=f".{INITIAL_STUDENT}.", dir=out))
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
            load_tokenizer(tokenizer_source).save_pretrained(str(tmp))
            if layers:
                (tmp / "kd_student.json").write_text(json.dumps({"layers_from_teacher": layers}) + "\n")
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"initial student written to {target}" + (f" (teacher layers {layers})" if layers else ""))
    return ModelSource("hf_dir", str(target.resolve()), INITIAL_STUDENT)


def run_round(
    cfg: OnPolicyConfig,
    index: int,
    prompts: list[Prompt],
    mix: MixSource | None,
    initial: ModelSource,
    steps: int,
    device: str,
    crossed: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """One round, each step skipped when its output is already complete.

    `crossed`: the (student's, teacher's) tokenizers where they differ (--cross-tokenizer).
    """
    out = Path(cfg.out)
    here = round_dir(out, index)
    done = here / ROUND_DONE
    if done.is_file():
        return json.loads(done.read_text())
    here.mkdir(parents=True, exist_ok=True)
    previous = round_dir(out, index - 1) / "train" if index else None
    sampler = initial if previous is None else ModelSource("hf_dir", str(previous.resolve()), previous.parent.name)
    timings = _read_json(here / "timings.json")

    samples = here / "samples.jsonl"
    if not samples.is_file():
        log(f"round {index}: {sampler.display_name} samples {cfg.prompts_per_round} prompts x {cfg.samples}")
        started = time.perf_counter()
        round_prompts = [prompts[i] for i in round_prompt_indices(len(prompts), cfg.prompts_per_round, index, cfg.seed)]
        settings = SamplerSettings(
            cfg.generation(index), cfg.template, cfg.system, cfg.engine, cfg.sample_batch_size, device
        )
        extra = mix.for_round(cfg.mix_per_round, index) if mix else []
        sample_round(sampler, round_prompts, settings, here, extra)
        timings = _record_time(here, timings, "sampling_seconds", started)
    records = read_samples(samples)

    scoring = ScoringSettings(
        cfg.teacher,
        cfg.teacher_engine,
        cfg.top_k,
        cfg.value_encoding,
        cfg.max_seq_len,
        cfg.teacher_batch_size,
        cfg.device,
        cfg.seed,
        temperatures=f"1,{cfg.distill_temperature!r}",  # training at T != 1 needs its tempered tail
        store=cfg.store,
        hidden_encoding=cfg.hidden_encoding,
    )
    if not cache_is_complete(here / "cache"):
        stored = f"top-{cfg.top_k}" if cfg.store == "topk" else f"{cfg.hidden_encoding} hidden states"
        log(f"round {index}: the teacher scores {len(records)} sequences ({stored})")
        started = time.perf_counter()
        score_samples(teacher_samples(samples, records, crossed), here / "cache", scoring)
        timings = _record_time(here, timings, "scoring_seconds", started)

    judged_path = here / "judge.json"
    if not judged_path.is_file():
        started = time.perf_counter()
        # Aligned as `kd eval --cross-tokenizer` aligns (a fresh Aligner: its coverage counts this round only).
        aligner = Aligner(crossed[1], crossed[0]) if crossed else None
        metrics, per_prompt = judge_samples(
            sampler, records, here / "cache", device, cfg.sample_batch_size, aligner=aligner
        )
        atomic_write_text(judged_path, json.dumps({"metrics": metrics, "per_prompt": per_prompt}) + "\n")
        timings = _record_time(here, timings, "judging_seconds", started)
    judged = json.loads(judged_path.read_text())["metrics"]
    on_policy = {"round": index, "student": sampler.path, **summarize_samples(records), **judged}
    atomic_write_lines(here / "metrics.jsonl", [json.dumps(on_policy) + "\n"])
    log(f"round {index}: " + _line(on_policy))

    started = time.perf_counter()
    train_dir = here / "train"
    summary = train(train_config(cfg, index, sampler, previous, train_dir, steps, here / "cache"))
    timings = _record_time(here, timings, "training_seconds", started)
    # From the trainer's own log, not its return value: a rerun that finds the round's last checkpoint
    # already written trains no step and returns no loss.
    logged = [m for m in _read_jsonl(train_dir / "metrics.jsonl") if "loss" in m]
    last = logged[-1] if logged else {}
    trained = {
        "round": index,
        "steps": summary["steps"],
        "train_loss": last.get("loss"),
        "train_divergence": last.get("divergence"),
        "train_ce": last.get("ce"),
        "lr": last.get("lr"),
        **timings,
    }
    atomic_write_lines(here / "metrics.jsonl", [json.dumps(on_policy) + "\n", json.dumps(trained) + "\n"])
    off_policy = sum(r["meta"].get("kind") != "on-policy" for r in records)  # not judged_sequences: across
    result = {**on_policy, **trained, "off_policy_sequences": off_policy}  # tokenizers a sample may go unscored
    atomic_write_text(done, json.dumps(result, indent=2) + "\n")
    log(f"round {index}: trained to step {summary['steps']} (loss {last.get('loss', float('nan')):.4f})")
    # The judged figures describe the student that sampled (index * steps trained steps); reported
    # once, when the round finishes, so a rerun that reuses a finished round adds no duplicate point.
    judged_now = {k: v for k, v in on_policy.items() if k != "round"}
    report_scalars(out, cfg.report_to, judged_now, index * steps, "on_policy/")
    report_scalars(out, cfg.report_to, {k: v for k, v in trained.items() if k != "round"}, summary["steps"], "round/")
    return result


def train_config(
    cfg: OnPolicyConfig,
    index: int,
    sampler: ModelSource,
    previous: Path | None,
    train_dir: Path,
    steps: int,
    cache: Path,
) -> TrainConfig:
    """Stage two for one round: this round's cache, continuing the previous round's optimizer and schedule."""
    return TrainConfig(
        out=str(train_dir),
        from_cache=str(cache),
        student=sampler.path,
        init_from=str(previous) if previous is not None else None,
        schedule_steps=steps * cfg.rounds,
        max_steps=steps,
        resume=latest_checkpoint(train_dir) is not None,
        alpha=cfg.alpha,
        temperature=cfg.distill_temperature,
        divergence=cfg.divergence,
        jsd_beta=cfg.jsd_beta,
        batch_size=cfg.batch_size,
        batch_tokens=cfg.batch_tokens,
        accumulation_steps=cfg.accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        min_lr_ratio=cfg.min_lr_ratio,
        grad_clip=cfg.grad_clip,
        dtype=cfg.dtype,
        chunk_size=cfg.chunk_size,
        save_every=cfg.save_every,
        keep_checkpoints=max(cfg.keep_checkpoints, 1),
        log_every=cfg.log_every,
        report_to=cfg.report_to,
        device=cfg.device,
        seed=cfg.seed + index,
        cross_tokenizer=cfg.cross_tokenizer,  # the student trains on its text re-tokenized canonically
    )


def write_run_metrics(out: Path, rounds: list[dict[str, Any]]) -> None:
    """OUT/metrics.jsonl: one line per finished round (rewritten whole, so a rerun never duplicates one)."""
    atomic_write_lines(out / "metrics.jsonl", [json.dumps(r) + "\n" for r in rounds])


def link_final_student(out: Path, final: Path) -> None:
    """OUT/student -> the last round's trained student (a relative symlink, replaced atomically)."""
    link = out / "student"
    tmp = out / ".student.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(final.relative_to(out))
    os.replace(tmp, link)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _record_time(here: Path, timings: dict[str, Any], key: str, started: float) -> dict[str, Any]:
    timings = {**timings, key: time.perf_counter() - started}
    atomic_write_text(here / "timings.json", json.dumps(timings) + "\n")
    return timings


def _line(metrics: dict[str, Any]) -> str:
    keys = ("reverse_kl", "teacher_logprob", "sample_tokens", "truncated_share", "answer_accuracy")
    parts = []
    for key in keys:
        value = metrics.get(key)
        if value is not None:
            parts.append(f"{key}={value:.4g}")
    return "  ".join(parts)
