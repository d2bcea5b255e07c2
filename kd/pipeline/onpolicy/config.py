"""Settings of `kd on-policy`, declared once (each field's docstring is its --help text)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from kd.cache import format as fmt
from kd.errors import KdError
from kd.losses import DIVERGENCES
from kd.pipeline.capture.config import ENGINES as TEACHER_ENGINES
from kd.pipeline.engines.generation import DEFAULT_TEMPLATE, GenerationSettings, resolve_engine
from kd.pipeline.models import check_device
from kd.pipeline.training.optim_settings import OptimizerSettings
from kd.settings import cli

SAMPLING_ENGINES = ("auto", "vllm", "transformers")


@dataclass
class OnPolicyConfig(OptimizerSettings):
    """Settings of `kd on-policy`; the step settings are stage two's, as each round trains with it."""

    out: str
    """Run directory: round-NNN/{samples.jsonl, cache/, metrics.jsonl, train/}; the same command resumes it."""
    prompts: str
    """Problems the student answers: .jsonl, .jsonl.zst or .parquet with GSM8K, prompt or conversations records."""
    teacher: str | None = None
    """Teacher that scores the samples: HF dir, .gguf or hub id [default: embedded SmolLM2-135M-Instruct]."""
    student: str | None = None
    """Initial student: HF dir, .gguf or config.json (random init)."""
    cross_tokenizer: bool = False
    """--student's tokenizer differs from --teacher's: each sample's text is re-tokenized for the teacher to
    score; the student is judged and trained on its text re-tokenized canonically, with the divergence on
    the targets the two tokenizations share (training/crosstok.py) and their coverage reported."""
    student_from_teacher: bool = False
    """Cut the initial student from the teacher's embeddings, chosen --layers, final norm and head."""
    layers: str | None = None
    """Teacher layers kept by --student-from-teacher, e.g. 0,10,20,29 or even:8 [default: even:8]."""
    rounds: int = 4
    """Rounds of sample -> score -> train."""
    prompts_per_round: int = 64
    """Prompts each round samples (taken in a seeded order, a new permutation each pass over --prompts)."""
    samples: int = 1
    """Completions the student samples per prompt."""
    max_new_tokens: int = 256
    """Longest completion; a longer one is cut (counted as truncated, still scored and trained on)."""
    temperature: float = 1.0
    """Sampling temperature of the student (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass of the student."""
    template: str = field(default=DEFAULT_TEMPLATE, metadata=cli(show_default=False))
    """User-turn template with a {question} placeholder (text, or a file holding it)."""
    system: str | None = None
    """Optional system prompt."""
    engine: str = "auto"
    """Sampling engine for the student: vllm, transformers, or auto (vllm if installed)."""
    sample_batch_size: int = 8
    """Samples per transformers generate() call (and per ledger write)."""
    teacher_engine: str = "transformers"
    """Scoring engine for the teacher (stage one's): transformers or vllm."""
    teacher_batch_size: int = 8
    """Sequences per teacher forward (transformers scoring engine)."""
    top_k: int = 64
    """Teacher top-k ids + log-probs cached per sampled token (with the tail mass)."""
    value_encoding: str = "sqrt8"
    """How the cache stores teacher probabilities: sqrt8, q64 or float32."""
    store: str = "topk"
    """What each round's cache keeps: topk (the teacher's --top-k + tail) or hidden (its final hidden states
    and head: the exact full-vocabulary distribution, so the judged and trained reverse KL on the student's
    samples is exact; d numbers per sampled token instead of k)."""
    hidden_encoding: str = "bf16"
    """With --store hidden: bf16, int8 (per-row scale) or float32."""
    max_seq_len: int = 2048
    """Longest prompt + completion scored and trained on (longer ones are cut)."""
    mix: float = 0.0
    """GKD's lambda: share of each round's training sequences taken from --mix-data (off-policy), 0 <= mix < 1."""
    mix_data: str | None = None
    """Off-policy corpus for --mix: chat-shaped records (conversations, messages, alpaca, prompt/completion, gsm8k)."""
    divergence: str = "reverse_kl"
    """forward_kl, reverse_kl, jsd or tvd (reverse KL: the on-policy practice, mode-seeking)."""
    jsd_beta: float = 0.5
    """beta of the generalized JSD."""
    alpha: float = 0.0
    """Loss = alpha*CE + (1-alpha)*T^2*divergence; CE on the student's own samples reinforces its mistakes."""
    distill_temperature: float = 1.0
    """Distillation temperature T of the loss (the sampling one is --temperature)."""
    steps_per_round: int | None = None
    """Optimizer steps per round [default: one pass over the round's sequences]."""
    batch_size: int = 4
    """Training sequences per micro-batch."""
    batch_tokens: int | None = None
    """Fill each training micro-batch up to this many padded tokens (needs --steps-per-round)."""
    # Redeclared only for its default and --help; kw_only as in the base, since required fields follow.
    learning_rate: float = field(default=5e-5, kw_only=True, metadata=cli("--learning-rate", "--lr"))
    """Peak learning rate (AdamW); the schedule (warmup, then cosine decay) spans all rounds."""
    save_every: int = 0
    """Checkpoint every N optimizer steps inside a round (0: at each round's end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept per round's training directory."""
    report_to: str = "none"
    """none, tensorboard or wandb: each round's judged and training figures to OUT (tags on_policy/*,
    round/*), each round's step metrics to its train/ (metrics.jsonl is always written)."""
    device: str | None = None
    """cpu, cuda, cuda:1 for sampling (transformers), scoring and training [default: cuda if available]."""
    seed: int = 0
    """Seed of the prompt order, the samples and the training data order."""

    def __post_init__(self) -> None:
        self.generation(0)  # validates --samples, --temperature, --top-p, --max-new-tokens
        if self.rounds < 1:
            raise KdError(f"--rounds must be >= 1, got {self.rounds}")
        if self.prompts_per_round < 1:
            raise KdError(f"--prompts-per-round must be >= 1, got {self.prompts_per_round}")
        if self.student is None and not self.student_from_teacher:
            raise KdError("give --student (model dir, .gguf or config.json) or --student-from-teacher")
        if self.student is not None and self.student_from_teacher:
            raise KdError("--student and --student-from-teacher are exclusive")
        if self.cross_tokenizer and self.student_from_teacher:
            raise KdError(
                "--cross-tokenizer with --student-from-teacher: a student cut from the teacher has its tokenizer"
            )
        if self.layers is not None and not self.student_from_teacher:
            raise KdError("--layers applies only with --student-from-teacher")
        if "{question}" not in self.template:
            raise KdError("--template must contain the placeholder {question}")
        if self.engine not in SAMPLING_ENGINES:
            raise KdError(f"--engine {self.engine}: expected one of {', '.join(SAMPLING_ENGINES)}")
        self.engine = resolve_engine(self.engine)
        if self.teacher_engine not in TEACHER_ENGINES:
            raise KdError(f"--teacher-engine {self.teacher_engine}: expected one of {', '.join(TEACHER_ENGINES)}")
        if self.top_k < 1:
            raise KdError(f"--top-k must be >= 1, got {self.top_k}")
        if self.value_encoding not in fmt.VALUE_ENCODINGS:
            raise KdError(f"--value-encoding {self.value_encoding}: expected one of {', '.join(fmt.VALUE_ENCODINGS)}")
        if self.store not in ("topk", "hidden"):
            raise KdError(f"--store {self.store}: expected topk or hidden")
        if self.store == "hidden" and self.cross_tokenizer:
            raise KdError(
                "--store hidden with --cross-tokenizer: a hidden cache's head speaks only the teacher's vocabulary"
            )
        if self.hidden_encoding not in fmt.HIDDEN_ENCODINGS:
            raise KdError(
                f"--hidden-encoding {self.hidden_encoding}: expected one of {', '.join(fmt.HIDDEN_ENCODINGS)}"
            )
        if not 0.0 <= self.mix < 1.0:
            raise KdError(f"--mix must be in [0, 1) (the off-policy share of each round), got {self.mix}")
        if self.mix > 0 and self.mix_data is None:
            raise KdError("--mix needs --mix-data (the off-policy corpus its share comes from)")
        if self.mix == 0 and self.mix_data is not None:
            raise KdError("--mix-data is used only with --mix > 0")
        if self.divergence not in DIVERGENCES:
            raise KdError(f"--divergence {self.divergence}: expected one of {', '.join(DIVERGENCES)}")
        if self.steps_per_round is not None and self.steps_per_round < 1:
            raise KdError(f"--steps-per-round must be >= 1, got {self.steps_per_round}")
        if self.batch_tokens is not None and self.steps_per_round is None:
            raise KdError("--batch-tokens needs --steps-per-round (steps cannot be counted from sequences)")
        for name, value in (
            ("--sample-batch-size", self.sample_batch_size),
            ("--teacher-batch-size", self.teacher_batch_size),
            ("--batch-size", self.batch_size),
        ):
            if value < 1:
                raise KdError(f"{name} must be >= 1, got {value}")
        self._check_optimizer()  # before --accumulation-steps counts sequences below
        per_step = self.batch_size * self.accumulation_steps
        if self.batch_tokens is None and self.samples_per_round + self.mix_per_round < per_step:
            raise KdError(
                f"each round has {self.samples_per_round + self.mix_per_round} sequences (--prompts-per-round x "
                f"--samples{' + --mix' if self.mix else ''}), fewer than one training step's --batch-size x "
                f"--accumulation-steps = {per_step}; raise the former or lower the latter"
            )
        if self.max_seq_len < 2:
            raise KdError(f"--max-seq-len must be >= 2, got {self.max_seq_len}")
        check_device(self.device)
        self._check_training()

    def _check_training(self) -> None:
        """Build round 0's TrainConfig and LossConfig now, so a bad training flag (--learning-rate -1,
        --alpha 2, --distill-temperature 0) is refused before a round samples or writes anything, and
        is named as this command spells it."""
        from kd.pipeline.models import ModelSource
        from kd.pipeline.onpolicy.run import train_config  # run.py imports this module

        out = Path(self.out)
        student = ModelSource("hf_dir", str(out / "student-init"), "student")
        try:
            train_config(self, 0, student, None, out / "round-000" / "train", 1, out).loss_config()
        except KdError as exc:
            raise KdError(re.sub(r"--temperature\b", "--distill-temperature", str(exc))) from None

    def generation(self, round_index: int) -> GenerationSettings:
        """How round `round_index` samples: a seed of its own, so rounds do not replay each other's draws."""
        return GenerationSettings(
            self.samples, self.temperature, self.top_p, self.max_new_tokens, self.seed * 1_000_003 + round_index
        )

    @property
    def samples_per_round(self) -> int:
        return self.prompts_per_round * self.samples

    @property
    def mix_per_round(self) -> int:
        """Off-policy sequences added to each round so that they are --mix of its sequences."""
        return round(self.mix / (1.0 - self.mix) * self.samples_per_round) if self.mix else 0

    def resolved_steps_per_round(self) -> int:
        """--steps-per-round, or one pass over the round's sequences at the global batch."""
        if self.steps_per_round is not None:
            return self.steps_per_round
        sequences = self.samples_per_round + self.mix_per_round
        return max(1, sequences // (self.batch_size * self.accumulation_steps))
