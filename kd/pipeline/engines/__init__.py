"""Engines: teacher log-prob engines (stage one) and generation engines (gen-traces); `layer_outputs`
catches chosen decoder layers' outputs (stage one's --hidden-layers and stage two's feature loss share it).

May import: kd.cache and the shared pipeline modules; never training, capture, evaluation, onpolicy or kd.losses.
"""
