"""Stage one (`kd cache-logits`) as a library: stream a corpus through a teacher into a logit cache.

    from kd.pipeline.capture import CacheConfig, run_cache_logits
    run_cache_logits(CacheConfig(data="train.jsonl", out="cache/"))

Modules: `config` (settings), `corpus` (records read and tokenized block by block on a background
thread), `plan` (shard, window, batch and record-batch boundaries: pure functions of the data),
`meter` (throughput, ETA, teacher share), `heap` (glibc's mmap threshold), `run` (the loop that ties
them to an engine and a writer).

May import: kd.cache, engines and the shared pipeline modules; never training, evaluation, onpolicy
or kd.losses.
"""

from kd.pipeline.capture.config import CacheConfig
from kd.pipeline.capture.run import default_device, run_cache_logits

__all__ = ["CacheConfig", "default_device", "run_cache_logits"]
