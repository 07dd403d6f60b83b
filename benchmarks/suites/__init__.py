"""The pytest-benchmark suites (dense vs pruned inference per backend, the cost of pruning, sparse matmul), the
models they time, their report and the README-figures command. Their options and fixtures are in
benchmarks/conftest.py, so `pytest benchmarks/` and `pytest benchmarks/suites/...` both work."""
