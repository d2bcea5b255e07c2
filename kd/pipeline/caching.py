"""Stage one's public entry points; the code lives in the `kd.pipeline.capture` wing.

from kd.pipeline.caching import CacheConfig, run_cache_logits
run_cache_logits(CacheConfig(data="train.jsonl", out="cache/"))
"""

from kd.pipeline.capture import CacheConfig, default_device, run_cache_logits
from kd.pipeline.capture.config import ENGINES

__all__ = ["ENGINES", "CacheConfig", "default_device", "run_cache_logits"]
