"""The optional `benchmark:` stage: dense vs pruned latency on the backends of `inc_plugins.perf.backends`.

Dense and pruned are timed by the interleaved timer (`inc_plugins.perf.timing`): each round times both, in an order
that alternates round by round, so a machine busy with other work slows both sides alike and their ratio stays fair.
An int8 backend (`openvino-int8-*`) quantizes both models on the quantize stage's calibration samples when the recipe
has that stage (the graphs the run evaluated), else on the timed inputs.
"""

import statistics

import torch

from inc_plugins.perf.backends import select_backends
from inc_plugins.perf.timing import interleaved_seconds

from .schema import Benchmark, RecipeError


def select_benchmark_backends(names: list[str]):
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


@torch.no_grad()
def benchmark_dense_and_pruned(dense: torch.nn.Module, pruned: torch.nn.Module, settings: Benchmark,
                               calibration: list[dict] | None = None) -> dict:
    """{backend id: median seconds per batch, dense and pruned, and the speed-up} (or why it could not run).
    `calibration`: the batches an int8 backend quantizes on (None: the timed inputs)."""
    inputs = example_inputs(dense, settings)
    results = {"inputs": {"batch_size": settings.batch_size, "seq_len": settings.seq_len},
               "rounds": settings.rounds, "threads": torch.get_num_threads(), "backends": {}}
    for backend in select_benchmark_backends(settings.backends):
        availability = backend.availability()
        if not availability.available:
            results["backends"][backend.id] = {"available": False, "reason": availability.reason}
            continue
        runs = [backend.prepare(dense, inputs, calibration), backend.prepare(pruned, inputs, calibration)]
        dense_times, pruned_times = interleaved_seconds([lambda run=run: run(inputs) for run in runs],
                                                        settings.warmup, settings.rounds)
        dense_s, pruned_s = statistics.median(dense_times), statistics.median(pruned_times)
        results["backends"][backend.id] = {"available": True, "settings": backend.settings, "dense_seconds": dense_s,
                                           "pruned_seconds": pruned_s, "speedup": dense_s / pruned_s}
        if "quantization" in backend.settings:
            results["backends"][backend.id]["calibrated_on"] = (
                "the timed inputs" if calibration is None else
                f"the quantize stage's {sum(len(batch['input_ids']) for batch in calibration)} calibration samples")
    return results
