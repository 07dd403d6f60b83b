"""The cost of pruning itself: wall time and peak memory of each pruner on the same model and calibration data.

Every round prunes a fresh copy of the dense model (copied in the untimed setup). Peak memory
(``inc_plugins.perf.memory.PeakRss``) is the largest resident-set size while the pruner runs, minus the size just
before it: the pruner's working memory (activations it stores, scores, Hessians), not the model's own weights.
"""

import copy

import pytest
import torch

from benchmarks.suites.pruned_models import block_linears, magnitude_per_output, prune, pruning_settings
from inc_plugins.perf.memory import PeakRss

# magnitude needs no calibration: |W| ranked within each output row, the baseline Wanda is compared with.
# mask_search_full: the `make demo` stage (rearrangement, tuning and their step checks) on the mask search's own
# calibration set (the minilm scale: the recipe's 2048 samples), where the others share the small cost set.
PRUNERS = ("wanda", "sparse_gpt", "mask_search", "mask_search_full", "magnitude")


def pruner_config(pruner: str, blocks: str) -> dict | None:
    """The INC config of a pruner of this suite (None: magnitude) for a model whose blocks are at `blocks`."""
    if pruner == "magnitude":
        return None
    if pruner == "sparse_gpt":
        return {"pruning_type": "sparse_gpt", "target_sparsity": 0.5, "pattern": "1x1", "op_names": [blocks]}
    if pruner == "mask_search_full":
        return {**pruning_settings("slim40", blocks), "rearrange": True, "tune": True, "check_steps": True}
    return pruning_settings({"wanda": "wanda50", "mask_search": "slim40"}[pruner], blocks)


@pytest.mark.parametrize("pruner", PRUNERS)
def test_pruning_cost(benchmark, pruner, settings, model_variants):
    task = model_variants.task
    config = pruner_config(pruner, task.blocks)
    calibration = task.calibration if pruner == "mask_search_full" else task.cost_calibration
    peaks, measures, phases = [], set(), []

    def fresh_copy():
        return (copy.deepcopy(task.model),), {}

    def prune_once(model):
        with PeakRss() as peak:
            if config is None:
                pruned = magnitude_per_output(model, task.blocks)
            else:
                pruned, result = prune(model, config, calibration)
                if pruner.startswith("mask_search"):  # where the time goes: Fisher pass, search, rearrangement, ...
                    phases.append(result.phase_seconds)
        peaks.append(peak.increase_mb)
        measures.add(peak.method)
        return pruned

    benchmark.group = f"pruning cost {settings.scale}"
    # pruning takes seconds to minutes: a fixed small round count, the first round included
    rounds = settings.rounds if settings.rounds is not None else 2
    pruned = benchmark.pedantic(prune_once, setup=fresh_copy, rounds=rounds, warmup_rounds=0, iterations=1)
    samples = sum(batch["input_ids"].shape[0] for batch in calibration)
    benchmark.extra_info.update({
        "suite": "pruning_cost", "scale": settings.scale, "pruner": pruner, "peak_memory_measure": sorted(measures),
        "config": config or {"criterion": "|W| per output row", "target_sparsity": 0.5},
        "calibration_samples": 0 if config is None else samples, "model": task.provenance["model"],
        "peak_rss_increase_mb": max(peaks), "torch_threads": torch.get_num_threads(),
        "parameters_after": sum(p.numel() for p in pruned.parameters()),
        **({"phase_seconds": phases} if phases else {}),
    })
    dense_parameters = sum(p.numel() for p in task.model.parameters())
    if pruner.startswith("mask_search"):
        assert sum(p.numel() for p in pruned.parameters()) < dense_parameters  # slimmed
    else:
        assert sum(int((m.weight == 0).sum()) for m in block_linears(pruned, task.blocks)) > 0
