"""Engines: teacher log-prob engines (stage one) and generation engines (gen-traces)."""
