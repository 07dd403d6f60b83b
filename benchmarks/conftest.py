"""pytest-benchmark harness of the suites in benchmarks/suites/: options, shared models and prepared backends,
and the machine description (``inc_plugins.perf.machine``, with the oneDNN probe) in machine info.

It sits here, above suites/, so that both `pytest benchmarks/` and `pytest benchmarks/suites/...` load it.

    pytest benchmarks/ --benchmark-only --benchmark-json out.json             # MiniLM, full grid, default backends
    pytest benchmarks/ --benchmark-disable --bench-scale tiny --bench-backends eager-fp32   # CI smoke pass

Options (each also read from an environment variable, so wrappers can set them):

--bench-scale     tiny | minilm                          INC_BENCH_SCALE     (default minilm)
--bench-grid      full | small | BxS,BxS...              INC_BENCH_GRID      (default full: batch 1/8/32 x seq 64/128)
--bench-backends  default | all | comma-separated ids    INC_BENCH_BACKENDS  (default: default = eager fp32/bf16,
                  inductor fp32, IPEX and OpenVINO fp32/bf16; all adds inductor bf16, freezing and max-autotune)
--bench-variants  all | comma-separated model variants   INC_BENCH_VARIANTS  (default all)
--bench-time      seconds of timed calls per benchmark   INC_BENCH_TIME      (default 2)
--bench-rounds    fixed rounds per benchmark (overrides --bench-time)  INC_BENCH_ROUNDS

The tiny scales' models have 64 positions, so their grid uses sequence lengths 16 and 32 in place of 64 and 128.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest

from benchmarks.suites.pruned_models import SCALES, TINY_SCALES, VARIANTS, dense_task, pruned_variant
from inc_plugins.perf.backends import BACKENDS, Backend, availability_table, select_backends
from inc_plugins.perf.machine import load_average, machine_description

FULL_GRID = [(batch, seq) for batch in (1, 8, 32) for seq in (64, 128)]
SMALL_GRID = [(1, 64), (32, 128)]
TINY_SEQ = {64: 16, 128: 32}
MIN_ROUNDS, MAX_ROUNDS = 5, 200

_OPTIONS = {  # option: (environment variable, default, help)
    "--bench-scale": ("INC_BENCH_SCALE", "minilm", f"model scale: {' | '.join(SCALES)}"),
    "--bench-grid": ("INC_BENCH_GRID", "full", "full | small | explicit shapes such as 32x128,1x64"),
    "--bench-backends": ("INC_BENCH_BACKENDS", "default", f"default | all | comma-separated: {', '.join(BACKENDS)}"),
    "--bench-variants": ("INC_BENCH_VARIANTS", "all", f"all | comma-separated: {', '.join(VARIANTS)}"),
    "--bench-time": ("INC_BENCH_TIME", "2", "seconds of timed calls per benchmark (rounds are derived from it)"),
    "--bench-rounds": ("INC_BENCH_ROUNDS", "", "fixed number of timed rounds per benchmark (overrides --bench-time)"),
}


def pytest_addoption(parser):
    group = parser.getgroup("inc-plugins benchmarks")
    for option, (variable, default, help_text) in _OPTIONS.items():
        group.addoption(option, default=None, help=f"{help_text} (env {variable}, default {default or 'unset'})")


def option(config, name: str) -> str:
    variable, default, _ = _OPTIONS[name]
    value = config.getoption(name)
    return value if value is not None else os.environ.get(variable, default)


def _parse_grid(spec: str, scale: str) -> list[tuple[int, int]]:
    if spec in ("full", "small"):
        shapes = FULL_GRID if spec == "full" else SMALL_GRID
    else:
        try:
            shapes = [tuple(int(v) for v in item.lower().split("x")) for item in spec.split(",") if item.strip()]
        except ValueError:
            shapes = []
        if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
            raise pytest.UsageError(f"--bench-grid {spec!r}: use full, small, or shapes like 32x128,1x64 (batch x seq)")
    return [(batch, TINY_SEQ.get(seq, seq)) for batch, seq in shapes] if scale in TINY_SCALES else shapes


@dataclass(frozen=True)
class BenchSettings:
    scale: str
    shapes: list
    backends: list
    variants: list
    seconds: float
    rounds: int | None

    def rounds_for(self, seconds_per_call: float) -> int:
        if self.rounds is not None:
            return self.rounds
        return max(MIN_ROUNDS, min(MAX_ROUNDS, int(self.seconds / max(seconds_per_call, 1e-6))))

    def describe(self) -> dict:
        return {"scale": self.scale, "shapes": [f"{b}x{s}" for b, s in self.shapes],
                "backends": [b.id for b in self.backends], "variants": self.variants,
                "seconds_per_benchmark": self.seconds, "fixed_rounds": self.rounds}


def bench_settings(config) -> BenchSettings:
    scale = option(config, "--bench-scale")
    if scale not in SCALES:
        raise pytest.UsageError(f"--bench-scale {scale!r}: choose from {', '.join(SCALES)}")
    try:
        backends = select_backends(option(config, "--bench-backends"))
    except ValueError as error:
        raise pytest.UsageError(f"--bench-backends: {error}") from None
    variants_spec = option(config, "--bench-variants")
    variants = list(VARIANTS) if variants_spec == "all" else [v.strip() for v in variants_spec.split(",")]
    if any(v not in VARIANTS for v in variants) or "dense" not in variants:
        raise pytest.UsageError(f"--bench-variants {variants_spec!r}: choose from {', '.join(VARIANTS)}; "
                                f"'dense' is required (pruned timings are compared with it)")
    rounds_spec = option(config, "--bench-rounds")
    try:
        seconds = float(option(config, "--bench-time"))
        rounds = int(rounds_spec) if rounds_spec else None
    except ValueError:
        raise pytest.UsageError("--bench-time takes seconds (a number), --bench-rounds a whole number") from None
    if seconds <= 0 or (rounds is not None and rounds < 1):
        raise pytest.UsageError("--bench-time must be > 0 and --bench-rounds >= 1")
    return BenchSettings(scale, _parse_grid(option(config, "--bench-grid"), scale), backends, variants, seconds, rounds)


def pytest_configure(config):
    config._bench_started_load = load_average()


def pytest_benchmark_update_machine_info(config, machine_info):
    settings = bench_settings(config)
    machine_info["cpu_features"] = machine_description(probe_onednn=True)
    machine_info["backends"] = availability_table()
    machine_info["bench_settings"] = settings.describe()
    machine_info["load_average"] = {"at_start": getattr(config, "_bench_started_load", None), "at_end": load_average(),
                                    "logical_cpus": os.cpu_count()}


# ------------------------------------------------------------------------------------------------ parametrization


@dataclass(frozen=True)
class InferenceCase:
    backend: Backend
    shape: tuple[int, int] | None  # None: the backend is unavailable, one case reports it
    variant: str | None

    @property
    def id(self) -> str:
        if self.shape is None:
            return f"{self.backend.id}-unavailable"
        return f"{self.backend.id}-b{self.shape[0]}xs{self.shape[1]}-{self.variant}"


def pytest_generate_tests(metafunc):
    if "inference_case" not in metafunc.fixturenames:
        return
    settings = bench_settings(metafunc.config)
    cases = []
    # backend, then shape, then variant: each (backend, shape) group runs back to back, so its prepared models
    # can be dropped before the next group's are built
    for backend in settings.backends:
        if not backend.availability().available:
            cases.append(InferenceCase(backend, None, None))
            continue
        cases += [InferenceCase(backend, shape, variant) for shape in settings.shapes for variant in settings.variants]
    metafunc.parametrize("inference_case", cases, ids=[c.id for c in cases])


# --------------------------------------------------------------------------------------------------- shared state


@pytest.fixture(scope="session")
def settings(request) -> BenchSettings:
    return bench_settings(request.config)


class ModelVariants:
    """The dense task and its pruned variants, each built on first use and kept for the session."""

    def __init__(self, scale: str):
        self.task = dense_task(scale)
        self._variants: dict[str, tuple] = {}

    def get(self, variant: str):
        if variant not in self._variants:
            self._variants[variant] = pruned_variant(self.task, variant)
        return self._variants[variant]


@pytest.fixture(scope="session")
def model_variants(settings) -> ModelVariants:
    return ModelVariants(settings.scale)


class PreparedRunners:
    """Backend runners of the current (backend, shape) group; a new group releases the previous one's."""

    def __init__(self, models: ModelVariants):
        self.models = models
        self._group = None
        self._runners: dict[str, tuple] = {}

    def get(self, backend: Backend, shape: tuple[int, int], variant: str, inputs: dict):
        """(runner, seconds spent preparing it) for `variant` on `backend` at `shape`."""
        if self._group != (backend.id, shape):
            self._group, self._runners = (backend.id, shape), {}
        if variant not in self._runners:
            model, _ = self.models.get(variant)
            start = time.perf_counter()
            runner = backend.prepare(model, inputs)
            self._runners[variant] = (runner, time.perf_counter() - start)
        return self._runners[variant]


@pytest.fixture(scope="session")
def prepared_runners(model_variants) -> PreparedRunners:
    return PreparedRunners(model_variants)
