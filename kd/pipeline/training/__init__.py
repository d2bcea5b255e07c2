"""Stage two (`kd train`) as a library: a student trained from a cache, a live teacher or plain data.

    from kd.pipeline.training.trainer import TrainConfig, train
    train(TrainConfig(from_cache="cache/", student="S/", out="student/"))

Modules: `trainer` (the entry point: re-exports TrainConfig, train, DistillStep), `config`
(TrainConfig, validated), `optim_settings` (the step settings on-policy shares), `loop` (the loop as
named steps), `setup` (data, teacher, student, wrapping), `inputs` (corpora, tag weights, the plan),
`step` (DistillStep, accumulation, the normalisation rule), `optimizer` (AdamW, schedule), `resume`
(checkpoints in a run, the resume contract), `distributed` (process group, device), `batches` (flat
target-token batches and teacher signals), `order` (the data order, a pure function of seed and
epoch), `stream` (the streaming loader with its prefetch thread), `prepared` (tokenized corpora for
--data), `students` (building students, LoRA), `checkpoint` (atomic checkpoint files and RNG state),
`sharding` (DDP/FSDP2), `features` (feature distillation: layer map and projections).

May import: kd.cache, kd.losses, the shared pipeline modules, engines (the online teacher) and
evaluation's held-out scoring; never capture, traces or onpolicy.
"""
