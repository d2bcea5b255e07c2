"""`kd gen-traces` as a library: R1-style reasoning traces generated, verified and written as SFT data.

    from kd.pipeline.traces.run import TracesConfig, run_gen_traces

Modules: `run` (prompts, the resumable ledger, the generation loop, SFT output), `verify` (final
answers extracted and compared; model strings are never evaluated as Python), `problems` (the
demo's own arithmetic problems).

May import: the shared pipeline modules and engines; never training, capture, losses or onpolicy.
"""
