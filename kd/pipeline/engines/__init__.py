"""Engines: teacher log-prob engines (stage one) and generation engines (gen-traces).

May import: kd.cache and the shared pipeline modules; never training, capture, evaluation, onpolicy or kd.losses.
"""
