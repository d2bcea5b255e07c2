"""The library behind kd's commands, in wings that match the stages.

- ``capture/``    stage one (`kd cache-logits`): corpus → teacher → cache shards.
- ``training/``   stage two (`kd train`): the trainer, batches, students, checkpoints, sharding, data order
                  and the streaming loader.
- ``traces/``     `kd gen-traces`: generation ledger, answer verification, the demo's problems.
- ``evaluation/`` `kd eval`, held-out scoring, reports, intervals and the demo.
- ``onpolicy/``   `kd on-policy`: rounds of student sampling, teacher scoring and training.
- ``engines/``    teacher log-prob engines (transformers, vLLM) and generation engines.

Top-level modules are the few every wing uses: ``data`` (record formats, tokenization), ``models``
(resolving and loading models and tokenizers), ``heads`` (hidden states → logits, the model's own
post-head transforms), ``progress`` and ``tracking``. The losses live in ``kd.losses`` and the
on-disk format in ``kd.cache``; nothing here imports ``kd.stages`` or ``kd.cli``
(tests/test_layering.py enforces every rule the wings state).
"""
