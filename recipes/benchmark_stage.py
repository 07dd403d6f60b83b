"""The optional `benchmark:` stage: dense vs pruned latency through the benchmark harness (`benchmarks.backends`).

The harness is imported only when a recipe asks for a benchmark. Dense and pruned runs alternate round by round,
so a machine busy with other work slows both sides alike and their ratio stays fair.
"""

import statistics
import time

import torch

from .schema import Benchmark, RecipeError


def select_benchmark_backends(names: list[str]):
    try:
        from benchmarks.backends import select_backends
    except ImportError as err:
        raise RecipeError(f"the benchmark stage needs the project's benchmarks package ({err})") from None
    try:
        return select_backends(",".join(names))
    except ValueError as err:
        raise RecipeError(f"benchmark.backends: {err}") from None


def example_inputs(model: torch.nn.Module, settings: Benchmark) -> dict:
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (settings.batch_size, settings.seq_len)
    return {"input_ids": torch.randint(0, vocab, shape, generator=generator),
            "attention_mask": torch.ones(shape, dtype=torch.long)}


def _seconds(run, inputs) -> float:
    start = time.perf_counter()
    run(inputs)
    return time.perf_counter() - start


@torch.no_grad()
def benchmark_dense_and_pruned(dense: torch.nn.Module, pruned: torch.nn.Module, settings: Benchmark) -> dict:
    """{backend id: median seconds per batch, dense and pruned, and the speed-up} (or why it could not run)."""
    inputs = example_inputs(dense, settings)
    results = {"inputs": {"batch_size": settings.batch_size, "seq_len": settings.seq_len},
               "rounds": settings.rounds, "threads": torch.get_num_threads(), "backends": {}}
    for backend in select_benchmark_backends(settings.backends):
        availability = backend.availability()
        if not availability.available:
            results["backends"][backend.id] = {"available": False, "reason": availability.reason}
            continue
        runs = {"dense": backend.prepare(dense, inputs), "pruned": backend.prepare(pruned, inputs)}
        for run in runs.values():
            for _ in range(settings.warmup):
                run(inputs)
        times = {"dense": [], "pruned": []}
        for _ in range(settings.rounds):
            for side, run in runs.items():
                times[side].append(_seconds(run, inputs))
        dense_s, pruned_s = statistics.median(times["dense"]), statistics.median(times["pruned"])
        results["backends"][backend.id] = {"available": True, "settings": backend.settings, "dense_seconds": dense_s,
                                           "pruned_seconds": pruned_s, "speedup": dense_s / pruned_s}
    return results
