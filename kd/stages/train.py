"""`kd train`: stage two (from a cache), online KD (live teacher), or (reasoning) SFT.

kd train --from-cache cache/ --student-from-teacher --layers even:8 --out student/
kd train --teacher T/ --data train.jsonl --student S/ --out student/            # online KD
kd train --data traces.jsonl --student S/ --out student/ --tag-weight 10       # reasoning SFT
torchrun --nproc-per-node 8 -m kd.cli train --from-cache cache/ --student S/ --out student/
"""

from __future__ import annotations

import json

import typer

from kd.pipeline.progress import log
from kd.pipeline.trainer import TrainConfig, train


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        out: str = typer.Option(
            ..., "--out", help="Output dir: final student (HF format), checkpoints/, metrics.jsonl."
        ),
        from_cache: str = typer.Option(None, "--from-cache", help="Cache from `kd cache-logits`: cached KD."),
        teacher: str = typer.Option(
            None,
            "--teacher",
            help="Live teacher for online KD (with --data), or the model --student-from-teacher cuts.",
        ),
        data: str = typer.Option(
            None, "--data", help="Corpus for online KD (with --teacher) or SFT / reasoning SFT (without)."
        ),
        data_format: str = typer.Option(None, "--data-format", help="Force the record format of --data."),
        student: str = typer.Option(None, "--student", help="Student: HF dir, .gguf, or config.json (random init)."),
        student_from_teacher: bool = typer.Option(
            False,
            "--student-from-teacher",
            help="Copy the teacher's embeddings, --layers, norm and head into a shallower student.",
        ),
        layers: str = typer.Option(
            None, "--layers", help="Teacher layers to keep, e.g. 0,10,20,29 or even:8 [default: even:8]."
        ),
        alpha: float = typer.Option(0.5, "--alpha", help="Loss = alpha*CE + (1-alpha)*T^2*divergence."),
        temperature: float = typer.Option(1.0, "--temperature", help="Distillation temperature T (> 0)."),
        divergence: str = typer.Option("forward_kl", "--divergence", help="forward_kl, reverse_kl, jsd or tvd."),
        jsd_beta: float = typer.Option(0.5, "--jsd-beta", help="beta of the generalized JSD."),
        epochs: float = typer.Option(1.0, "--epochs", help="Passes over the data (ignored with --max-steps)."),
        max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps (overrides --epochs)."),
        batch_size: int = typer.Option(4, "--batch-size", help="Sequences per micro-batch per process."),
        batch_tokens: int = typer.Option(
            None,
            "--batch-tokens",
            help="Fill micro-batches up to N padded tokens (length-grouped in the shuffle window) instead of "
            "--batch-size sequences.",
        ),
        shuffle_window: int = typer.Option(
            1024,
            "--shuffle-window",
            help="Sequences shuffled together; the data path holds about this many (a window as large as the "
            "data is a full shuffle).",
        ),
        prefetch: int = typer.Option(2, "--prefetch", help="Steps decoded ahead of training on a background thread."),
        accumulation_steps: int = typer.Option(1, "--accumulation-steps", help="Micro-batches per optimizer step."),
        learning_rate: float = typer.Option(1e-4, "--learning-rate", "--lr", help="Peak learning rate (AdamW)."),
        weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
        warmup_steps: int = typer.Option(0, "--warmup-steps", help="Linear warmup steps."),
        min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio", help="Cosine floor as a fraction of the peak LR."),
        grad_clip: float = typer.Option(1.0, "--grad-clip", help="Max gradient norm (0 disables)."),
        dtype: str = typer.Option(
            "auto", "--dtype", help="auto (bf16 autocast on CUDA, fp32 on CPU), bfloat16, float32."
        ),
        save_every: int = typer.Option(0, "--save-every", help="Checkpoint every N steps (0: only at the end)."),
        keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", help="How many checkpoints to keep."),
        eval_cache: str = typer.Option(
            None, "--eval-cache", help="Held-out cache: CE, KL to teacher, top-1 agreement, ECE."
        ),
        eval_data: str = typer.Option(
            None, "--eval-data", help="Held-out corpus (CE, accuracy, ECE; no teacher metrics)."
        ),
        eval_every: int = typer.Option(0, "--eval-every", help="Evaluate every N steps (0: only at the end)."),
        log_every: int = typer.Option(10, "--log-every", help="Log metrics every N steps."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
        init_from: str = typer.Option(
            None,
            "--init-from",
            help="Start from another run's checkpoint (checkpoints/step-N dir, or its --out): weights, AdamW "
            "state and step count continue.",
        ),
        schedule_steps: int = typer.Option(
            None, "--schedule-steps", help="Length of the LR schedule in steps [default: this run's last step]."
        ),
        fsdp: bool = typer.Option(
            False, "--fsdp", help="Under torchrun, shard the student with FSDP2 (too big for one GPU) instead of DDP."
        ),
        lora: int = typer.Option(
            None, "--lora", help="Train LoRA adapters of this rank (peft) instead of all weights."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of data order and initialisation."),
        chunk_size: int = typer.Option(1024, "--chunk-size", help="Target tokens per logits chunk (memory bound)."),
        max_seq_len: int = typer.Option(2048, "--max-seq-len", help="Longest sequence for --data."),
        tag_weight: float = typer.Option(
            1.0, "--tag-weight", help="Reasoning SFT: CE weight of <think>/</think> tag tokens."
        ),
        report_to: str = typer.Option(
            "none", "--report-to", help="none, tensorboard or wandb (metrics.jsonl is always written)."
        ),
        device: str = typer.Option(
            None, "--device", help="cpu, cuda, cuda:1 [default: cuda:$LOCAL_RANK if available]."
        ),
        teacher_device: str = typer.Option(None, "--teacher-device", help="Put the online teacher on its own device."),
        limit: int = typer.Option(None, "--limit", help="Use only the first N sequences."),
        as_json: bool = typer.Option(False, "--json", help="Print the final metrics as JSON on stdout."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Train a student: from a logit cache (stage two), with a live teacher (online KD), or plain SFT."""
        cfg = TrainConfig(
            out=out,
            from_cache=from_cache,
            teacher=teacher,
            data=data,
            data_format=data_format,
            student=student,
            student_from_teacher=student_from_teacher,
            layers=layers,
            alpha=alpha,
            temperature=temperature,
            divergence=divergence,
            jsd_beta=jsd_beta,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            batch_tokens=batch_tokens,
            shuffle_window=shuffle_window,
            prefetch=prefetch,
            accumulation_steps=accumulation_steps,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            grad_clip=grad_clip,
            dtype=dtype,
            save_every=save_every,
            keep_checkpoints=keep_checkpoints,
            eval_cache=eval_cache,
            eval_data=eval_data,
            eval_every=eval_every,
            log_every=log_every,
            resume=resume,
            init_from=init_from,
            schedule_steps=schedule_steps,
            lora=lora,
            fsdp=fsdp,
            seed=seed,
            chunk_size=chunk_size,
            max_seq_len=max_seq_len,
            tag_weight=tag_weight,
            report_to=report_to,
            device=device,
            teacher_device=teacher_device,
            limit=limit,
        )
        cfg.loss_config()  # validate --alpha/--temperature/--divergence before loading anything
        summary = train(cfg)
        if as_json:
            typer.echo(json.dumps(summary))
        else:
            log(f"[green]student saved to {summary['out']} after {summary['steps']} steps[/green]")
