"""Kwon et al. (2022), "A Fast Post-Training Pruning Framework for Transformers", end to end on a model.

One module per step (the paper's sections): ``mask_gradients`` (Fisher, 4.1), ``flops_budget`` and
``latency_budget`` (the constrained search, 4.1), rearrangement (``inc_plugins.algorithms.rearrange``, 4.2),
``mask_tuning`` (4.3), ``bias_compensation`` (FLAP's, an option), ``step_checks`` (keeps rearrangement and tuning only when they raise the agreement with the
dense model's predictions; not in the paper), and ``pipeline``, which chains them. No INC here:
``inc_plugins.inc.mask_search`` registers the pipeline as INC's pruning type "mask_search".
"""

from .bias_compensation import OutputBiasShifts, add_bias_shifts, removed_unit_bias_shifts
from .flops_budget import UnitCosts, masked_macs, search_masks_under_flops, unit_costs
from .latency_budget import (
    LatencyTable,
    LatencyTableMismatchError,
    as_latency_table,
    check_machine,
    current_machine,
    unit_latency_table,
)
from .mask_gradients import MaskGradients, collect_mask_gradients
from .mask_tuning import KeptUnitEquations, TuningResult, tune_mask_scales, unit_normal_equations
from .pipeline import CONSTRAINTS, KwonResult, KwonSettings, fold_kwon_result, prune_post_training

__all__ = [
    "CONSTRAINTS",
    "KeptUnitEquations",
    "KwonResult",
    "KwonSettings",
    "LatencyTable",
    "LatencyTableMismatchError",
    "MaskGradients",
    "OutputBiasShifts",
    "TuningResult",
    "add_bias_shifts",
    "UnitCosts",
    "as_latency_table",
    "check_machine",
    "collect_mask_gradients",
    "current_machine",
    "fold_kwon_result",
    "masked_macs",
    "prune_post_training",
    "removed_unit_bias_shifts",
    "search_masks_under_flops",
    "tune_mask_scales",
    "unit_costs",
    "unit_latency_table",
    "unit_normal_equations",
]
