"""kd: offline knowledge distillation for LLMs.

Stage one (`kd cache-logits`) runs the teacher once and caches its top-k log-probabilities;
stage two (`kd train --from-cache`) trains students from that cache; `kd gen-traces` makes
R1-style reasoning traces for black-box distillation.
"""

__version__ = "0.1.0"
