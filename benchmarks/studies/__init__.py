"""The studies behind docs/results/: one module per study, `python -m benchmarks.studies.<name> [--quick]`.
Each reads its settings from the shipped recipes and settings.yaml, and writes <out>/<name>.{json,md,png}
through `common`."""
