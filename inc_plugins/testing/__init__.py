"""Tiny, seeded models and calibration batches for tests and quick benchmarks (synthetic, no downloads)."""
