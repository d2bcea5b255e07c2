"""Evaluation: held-out scoring of a model (`kd eval`), intervals and reports, and the demo.

Modules: `sequences` (CE, KL and agreement of a model on tokenized held-out sequences, per
sequence), `model_eval` (`kd eval`: a model against data, a cache or a teacher), `report`
(intervals, verdicts and the demo's report), `compare` (`kd compare`: models scored on the same
sequences, paired intervals against a baseline), `demo` (`kd demo`: the whole pipeline end to end).

May import: kd.cache, kd.losses, the shared pipeline modules, engines, and training's batches and
checkpoints (`kd compare` reads `kd train` checkpoints).
"""
