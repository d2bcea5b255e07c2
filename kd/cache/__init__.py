"""The teacher-logit cache: shard format, manifest, writer and reader.

Knows no model: imports numpy, pyarrow and zstandard, never torch, kd.losses or kd.pipeline.
"""
