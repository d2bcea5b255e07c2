"""Stage two (`kd train`) as a library: a student trained from a cache, a live teacher or plain data.

    from kd.pipeline.training.trainer import TrainConfig, train
    train(TrainConfig(from_cache="cache/", out="student/"))

Modules: `trainer` (settings and the loop), `batches` (flat target-token batches and teacher
signals), `order` (the data order, a pure function of seed and epoch), `stream` (the streaming
loader with its prefetch thread), `prepared` (tokenized corpora for --data), `students` (building
students, LoRA), `checkpoint` (atomic checkpoints and RNG state), `sharding` (DDP/FSDP2).

May import: kd.cache, kd.losses, the shared pipeline modules, engines (the online teacher) and
evaluation's held-out scoring; never capture, traces or onpolicy.
"""
