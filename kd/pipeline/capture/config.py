"""Settings of `kd cache-logits`, validated once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from kd.cache import format as fmt
from kd.errors import KdError
from kd.pipeline.engines.teacher import VLLM_SCORINGS
from kd.pipeline.models import check_device, check_dtype

ENGINES = ("transformers", "vllm")


@dataclass
class CacheConfig:
    """Settings of `kd cache-logits`."""

    data: str
    """Corpus: .jsonl, .jsonl.zst or .parquet."""
    out: str
    """Cache directory (created; an existing cache with the same settings is resumed)."""
    teacher: str | None = None
    """HF model directory, .gguf file or hub id; default: the embedded SmolLM2-135M-Instruct."""
    data_format: str | None = None
    """Force the record format instead of detecting it."""
    engine: str = "transformers"
    """transformers or vllm."""
    top_k: int = 64
    """Top-k ids and log-probs stored per target token. With the default sqrt8 values the stored
    teacher is within 2k/360² nats/token KL of the exact one (worst case; 9.9e-4 at k=64, 2.0e-3 at
    128, 4.0e-3 at 256; real rows stay well below): for k > 64 and a tight budget use --value-encoding q64."""
    store: str = "topk"
    """What is stored per target token: topk (the teacher's top-k log-probs, or rs draws with --sampling rs;
    ~40-100 B/token) or hidden (the teacher's final hidden state, d numbers, plus its LM head once: stage
    two recomputes the exact full-vocabulary distribution; bf16 2d B/token, int8 d+4)."""
    hidden_encoding: str = "bf16"
    """With --store hidden: bf16 (relative error <= 2^-8 per number), int8 (per-row scale max|h|/127;
    half the bytes) or float32 (exact)."""
    hidden_layers: str | None = None
    """With --store hidden: also store the teacher's states at these intermediate layers, e.g. 8,15 (the
    output of decoder layer i, 0-based, before any final norm), same encoding, for `kd train --feature-loss`.
    Each layer costs as much as the final state. Transformers engine only."""
    sampling: str | None = None
    """``rs`` for random-sampling KD instead of top-k."""
    samples: int = 64
    """Draws per target token in rs mode."""
    value_encoding: str = "auto"
    """sqrt8 (sqrt p in one byte; KL to the exact teacher at most 2k/360² nats/token: 9.9e-4 at k=64,
    2.0e-3 at k=128), q64 (uint16 log-probs, max error 0.0078 nats per value, KL ~3e-5 at any k),
    float32 (exact), or auto: sqrt8, but q64 when --temperatures asks for a T != 1 (sqrt8's coarse
    small probabilities, raised to 1/T, cost 3e-3 nats/token at T=2 on SmolLM2; q64 8e-7)."""
    temperatures: str = "1"
    """Temperatures the cache will be exact at, e.g. 1,2,4: for each T != 1 stage one also records the
    log of the tail mass of softmax(z/T) per target (float16; float32 with float32 values), so that
    `kd train --temperature T` trains on the exact tempered teacher (a T the cache lacks is refused).
    Top-k mode; not with --vllm-scoring logprobs (vLLM's prompt log-probs hold no tail shape)."""
    mass_epsilon: float = 0.0
    """Adaptive top-k: keep only the leading ids until they hold 1 - epsilon of the mass (0: always k)."""
    max_seq_len: int = 2048
    """Longest sequence; longer ones are truncated or skipped (see overflow)."""
    overflow: str = "truncate"
    """truncate or skip sequences longer than max_seq_len."""
    batch_size: int = 8
    """Sequences per teacher forward (transformers engine, when batch_tokens is not set)."""
    batch_tokens: int | None = None
    """Padded tokens per teacher forward (transformers engine): fills each batch with length-sorted
    sequences up to this budget instead of batch_size sequences. Must be >= max_seq_len."""
    window_tokens: int = 131_072
    """Sequence tokens handed to the teacher at once (at most; a shard's end closes a window early).
    vLLM schedules a whole window itself; transformers sorts it by length and cuts it into batches.
    Bounds what stage one holds: the window's ids and its teacher results."""
    block_records: int = 1024
    """Corpus records read and tokenized per block (one fast-tokenizer call per block)."""
    shard_tokens: int = 1_000_000
    """Target tokens per shard (the unit of resume)."""
    rank: int | None = None
    """This process's rank [default: $RANK or 0]."""
    world_size: int | None = None
    """Number of processes splitting the corpus [default: $WORLD_SIZE or 1]."""
    device: str | None = None
    """cpu, cuda, cuda:1: where the teacher runs (transformers) or kd's LM head (vLLM hidden scoring)
    [default: cuda:$LOCAL_RANK when CUDA is available, else cpu]."""
    dtype: str = "auto"
    """Teacher dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32."""
    device_map: str | None = None
    """'auto' spreads a teacher too big for one GPU over all GPUs (transformers engine)."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism."""
    vllm_scoring: str = "auto"
    """How the vLLM engine scores: hidden (vLLM returns each position's final hidden state and kd applies
    the LM head at target positions only; top-k or rs), logprobs (vLLM's prompt log-probs: head and
    log-softmax at every position; top-k only) or auto (hidden where the installed vLLM and the
    checkpoint allow it)."""
    seed: int = 0
    """Seed of the rs draws."""
    limit: int | None = None
    """Use only the first N records of the corpus."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # torchrun's environment gives each process its place unless the flags say otherwise.
        if self.rank is None:
            self.rank = int(os.environ.get("RANK", 0))
        if self.world_size is None:
            self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        if self.engine not in ENGINES:
            raise KdError(f"--engine {self.engine}: expected one of {', '.join(ENGINES)}")
        if self.vllm_scoring not in VLLM_SCORINGS:
            raise KdError(f"--vllm-scoring {self.vllm_scoring}: expected one of {', '.join(VLLM_SCORINGS)}")
        if self.engine == "vllm" and self.vllm_scoring == "logprobs" and self.sampling == "rs":
            raise KdError("--sampling rs with --engine vllm needs --vllm-scoring hidden (prompt log-probs: top-k only)")
        if self.store not in ("topk", "hidden"):
            raise KdError(f"--store {self.store}: expected topk or hidden")
        if self.store == "hidden" and self.sampling is not None:
            raise KdError("--store hidden keeps the whole distribution; drop --sampling")
        if self.hidden_encoding not in fmt.HIDDEN_ENCODINGS:
            raise KdError(
                f"--hidden-encoding {self.hidden_encoding}: expected one of {', '.join(fmt.HIDDEN_ENCODINGS)}"
            )
        if self.hidden_layers is not None:
            self._check_hidden_layers()
        if self.sampling not in (None, "rs"):
            raise KdError(f"--sampling {self.sampling}: the only sampling mode is 'rs'")
        if self.top_k < 1:
            raise KdError(f"--top-k must be >= 1, got {self.top_k}")
        if not 1 <= self.samples <= 65535:
            raise KdError(f"--samples must be in [1, 65535], got {self.samples}")
        if not 0.0 <= self.mass_epsilon < 1.0:
            raise KdError(f"--mass-epsilon must be in [0, 1), got {self.mass_epsilon}")
        if self.mass_epsilon and self.sampling == "rs":
            raise KdError("--mass-epsilon applies to top-k caches, not --sampling rs")
        if self.mass_epsilon and self.store == "hidden":
            raise KdError("--mass-epsilon applies to top-k caches, not --store hidden")
        if self.engine == "vllm" and self.vllm_scoring == "logprobs" and self.store == "hidden":
            raise KdError("--store hidden with --engine vllm needs --vllm-scoring hidden (prompt log-probs: no states)")
        tempered = fmt.parse_temperatures(self.temperatures)
        if len(tempered) > 1 and self.sampling == "rs":
            raise KdError("--temperatures applies to top-k caches; an rs cache's samples are drawn at T=1")
        if len(tempered) > 1 and self.store == "hidden":
            raise KdError("--temperatures applies to top-k caches; a --store hidden cache is exact at any temperature")
        if len(tempered) > 1 and self.engine == "vllm" and self.vllm_scoring == "logprobs":
            raise KdError(
                "--temperatures with --vllm-scoring logprobs: vLLM's prompt log-probs hold only the top-k, "
                "not the full logits a tempered tail needs; use --vllm-scoring hidden"
            )
        if self.value_encoding == "auto":  # resolved here: the manifest and config.yaml hold what was used
            self.value_encoding = "q64" if len(tempered) > 1 else "sqrt8"
        if self.value_encoding not in fmt.VALUE_ENCODINGS:
            choices = ", ".join(("auto", *fmt.VALUE_ENCODINGS))
            raise KdError(f"--value-encoding {self.value_encoding}: expected one of {choices}")
        if self.max_seq_len < 2:
            raise KdError(f"--max-seq-len must be >= 2, got {self.max_seq_len}")
        if self.overflow not in ("truncate", "skip"):
            raise KdError(f"--overflow {self.overflow}: expected truncate or skip")
        if self.batch_size < 1:
            raise KdError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.batch_tokens is not None and self.batch_tokens < self.max_seq_len:
            raise KdError(
                f"--batch-tokens {self.batch_tokens} is smaller than --max-seq-len {self.max_seq_len}: "
                "a sequence of that length would not fit; raise --batch-tokens or lower --max-seq-len"
            )
        if self.window_tokens < 1:
            raise KdError(f"--window-tokens must be >= 1, got {self.window_tokens}")
        if self.block_records < 1:
            raise KdError(f"--block-records must be >= 1, got {self.block_records}")
        if self.shard_tokens < 1:
            raise KdError(f"--shard-tokens must be >= 1, got {self.shard_tokens}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise KdError(f"--rank {self.rank} / --world-size {self.world_size}: need 0 <= rank < world size")
        if self.limit is not None and self.limit < 1:
            raise KdError(f"--limit must be >= 1, got {self.limit}")
        check_dtype(self.dtype)
        check_device(self.device)

    def _check_hidden_layers(self) -> None:
        if self.store != "hidden":
            raise KdError("--hidden-layers needs --store hidden (the layers are stored beside the final hidden state)")
        if self.engine == "vllm":
            raise KdError("--hidden-layers needs --engine transformers (vLLM returns only the final hidden state)")
        self.hidden_layers = ",".join(map(str, parse_layer_list(self.hidden_layers, "--hidden-layers")))

    @property
    def layers(self) -> tuple[int, ...]:
        """The intermediate layers to store (--hidden-layers), sorted; () if none."""
        return parse_layer_list(self.hidden_layers, "--hidden-layers") if self.hidden_layers else ()

    @property
    def mode(self) -> str:
        if self.store == "hidden":
            return "hidden"
        return "rs" if self.sampling == "rs" else "topk"

    @property
    def tempered(self) -> tuple[float, ...]:
        """The requested temperatures other than 1 (a tempered tail each), sorted."""
        return tuple(t for t in fmt.parse_temperatures(self.temperatures) if t != 1.0)


def parse_layer_list(text: str, flag: str) -> tuple[int, ...]:
    """'15,8' -> (8, 15): sorted, unique, each >= 0 (the teacher's depth is checked once it is known)."""
    try:
        layers = {int(part) for part in str(text).split(",")}
    except ValueError:
        raise KdError(f"{flag} {text}: expected comma-separated layer indices such as 8,15") from None
    if not layers or min(layers) < 0:
        raise KdError(f"{flag} {text}: layer indices are >= 0 (0 is the first decoder layer)")
    return tuple(sorted(layers))
