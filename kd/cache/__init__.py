"""The teacher-logit cache: shard format, manifest, writer and reader."""
