"""The standard-benchmark step: lmms-eval as the harness (official task code and
metrics), the project's lmms-eval model class, local stand-in data and the backends
that answer requests under the project's interventions.

Submodules are imported explicitly (``embedlens.bench.harness`` ...): importing lmms-eval
takes ~10 s, so nothing here imports it at package import time.
"""
