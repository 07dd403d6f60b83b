"""Lottery-ticket rounds whose weights INC's own ``magnitude`` pruner chooses.

The rounds as the paper runs them (each trained to the end, from a fresh optimizer) need a driver around the caller's
training, which INC's step callbacks do not own: ``execution.lottery_rounds.run_lottery_rounds`` is that driver (the
INC type ``lottery_ticket``, ``lottery_ticket_pruner.py``, rewinds inside one training loop instead).
``inc_magnitude_round`` is a drop-in ``prune_round`` for it (``prune_round=inc_magnitude_round`` or
``functools.partial(inc_magnitude_round, scope="layer", layer_fractions={"classifier": p / 2})``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from neural_compressor.compression.pruner.pruners import get_pruner
from neural_compressor.compression.pruner.utils import process_config
from torch import Tensor, nn

from inc_plugins.algorithms.exact_fraction import fraction_pruning_exactly
from inc_plugins.algorithms.lottery_ticket import Masks, apply_masks, check_round_scope

from .config import pruning_config

__all__ = ["inc_magnitude_round"]


def _inc_magnitude_masks(layers: Mapping[str, nn.Module], count: int) -> Masks:
    """INC's magnitude pruner prunes exactly ``count`` weights of ``layers``, ranked together."""
    total = sum(layer.weight.numel() for layer in layers.values())
    config = pruning_config(
        pruning_type="magnitude", pattern="1x1", target_sparsity=fraction_pruning_exactly(count, total),
        pruning_scope="global", start_step=0, end_step=0, max_sparsity_ratio_per_op=0.9999,
    )
    (info,) = process_config(config)
    pruner = get_pruner(info, dict(layers))
    pruner.on_step_begin(0)  # INC's magnitude criterion and NxM pattern choose the masks (and zero the weights)
    return {name: pruner.masks[name].bool().clone(memory_format=torch.contiguous_format) for name in layers}


def inc_magnitude_round(
    layers: Mapping[str, nn.Module],
    masks: Mapping[str, Tensor],
    fraction: float,
    scope: str = "global",
    layer_fractions: Mapping[str, float] | None = None,
) -> Masks:
    """One lottery-ticket round chosen by INC's ``magnitude`` pruner: prune ``fraction`` of the remaining weights.

    INC is given the cumulative target (already pruned + ``round(fraction * remaining)``, per layer for
    ``scope="layer"``, across layers for ``"global"``); the pruned weights are zero (masks are applied first),
    so INC's magnitude ranking keeps them pruned. A drop-in ``prune_round`` for ``run_lottery_rounds``;
    the pruned weights are also zeroed in place (INC's ``mask_weights``). ``layer_fractions`` ({layer: rate},
    ``scope="layer"`` only) overrides the rate of some layers, e.g. the paper's half rate for the output layer.
    """
    check_round_scope(layers, scope, layer_fractions)
    for name, rate in {"": fraction, **(layer_fractions or {})}.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"fraction{f' of {name!r}' if name else ''} must be in [0, 1), got {rate!r}")
    apply_masks(layers, masks)
    groups = [dict(layers)] if scope == "global" else [{name: layer} for name, layer in layers.items()]
    new: Masks = {}
    for group in groups:
        rate = (layer_fractions or {}).get(next(iter(group)), fraction) if scope == "layer" else fraction
        pruned = sum(int((~masks[name].bool()).sum()) for name in group)
        remaining = sum(int(masks[name].bool().sum()) for name in group)
        count = pruned + round(rate * remaining)
        if count == pruned:
            new.update({name: masks[name].bool().clone(memory_format=torch.contiguous_format) for name in group})
            continue
        new.update(_inc_magnitude_masks(group, count))
    return new
