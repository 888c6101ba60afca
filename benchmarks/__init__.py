"""The throughput benchmark: the worker end to end against PyTorch baselines and the model-only ceiling.

Run it as ``python benchmarks/bench.py --help``. The modules here are not part of the
installed package; they import ``worker`` and ``exporter`` like any user would.
"""
