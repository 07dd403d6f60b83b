"""Lottery tickets (Frankle and Carbin 2019, arXiv:1803.03635): the mask math of iterative magnitude pruning.

The procedure: initialise ``theta_0``; train; prune ``p%`` of the *remaining* weights with the smallest
magnitude (per layer, or globally for deep networks as in the paper's Section 4); reset the surviving weights to
``theta_0`` (the "winning ticket"); repeat. The rounds (training, rewinding, the random re-initialisation
control) are driven by ``inc_plugins.execution.lottery_rounds``; this module holds what a round computes:

- **Masks live outside the weights**: ``{layer name: bool tensor shaped like layer.weight}`` (True = kept);
  ``apply_masks`` zeroes the pruned weights in place.
- **Counting**: a round prunes ``round(p * remaining)`` weights per layer (``scope="layer"``) or across the
  selected layers (``scope="global"``). Ties in magnitude go to the lower flat index first. The paper prunes
  output layers at half the rate of the others in its per-layer experiments: pass
  ``layer_fractions={"classifier": p / 2}`` for that.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

Masks = dict[str, Tensor]


def dense_masks(layers: Mapping[str, nn.Module]) -> Masks:
    """All-True masks shaped like each layer's weight."""
    return {name: torch.ones(layer.weight.shape, dtype=torch.bool, device=layer.weight.device)
            for name, layer in layers.items()}


def remaining_fraction(masks: Mapping[str, Tensor]) -> float:
    """Fraction of the masked weights that are kept."""
    kept = sum(int(mask.sum()) for mask in masks.values())
    return kept / sum(mask.numel() for mask in masks.values())


def _lowest_kept(scores: Tensor, keep: Tensor, count: int) -> Tensor:
    """Flat indices of the ``count`` lowest scores among kept entries (ties: lower index first)."""
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    flat = scores.detach().flatten().double().cpu().masked_fill(~keep.flatten().cpu(), float("inf"))
    return torch.sort(flat, stable=True).indices[:count]


def check_prune_fraction(value: float, what: str) -> None:
    """ValueError unless ``value`` is a number in [0, 1); ``what`` names it in the message."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")


def check_round_scope(layers: Mapping[str, object], scope: str, layer_fractions: Mapping[str, float] | None) -> None:
    """ValueError unless ``scope`` is "global" or "layer" and ``layer_fractions`` (per-layer rates, "layer" scope
    only) names pruned layers: the arguments every pruning round takes."""
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    if layer_fractions and scope != "layer":
        raise ValueError("layer_fractions sets per-layer rates, which only apply with scope='layer'")
    unknown = sorted(set(layer_fractions or {}) - set(layers))
    if unknown:
        raise ValueError(f"layer_fractions names layers that are not pruned: {unknown}")


def magnitude_prune_round(
    layers: Mapping[str, nn.Module],
    masks: Mapping[str, Tensor],
    fraction: float,
    scope: str = "global",
    layer_fractions: Mapping[str, float] | None = None,
) -> Masks:
    """New masks that additionally prune ``fraction`` of the *remaining* weights by magnitude ``|w|``.

    ``scope="layer"``: each layer prunes ``round(f * remaining_in_layer)``, with ``f`` from ``layer_fractions``
    (default ``fraction``). ``scope="global"``: ``round(fraction * remaining_in_all_layers)`` ranked together.
    Already-pruned weights stay pruned. ``masks`` are not modified.
    """
    check_prune_fraction(fraction, "prune fraction")
    check_round_scope(layers, scope, layer_fractions)
    new = {name: mask.bool().clone(memory_format=torch.contiguous_format) for name, mask in masks.items()}
    if scope == "layer":
        for name, layer in layers.items():
            rate = (layer_fractions or {}).get(name, fraction)
            check_prune_fraction(rate, f"prune fraction of {name!r}")
            keep = new[name]
            count = round(rate * int(keep.sum()))
            flat = keep.view(-1)
            flat[_lowest_kept(layer.weight.abs(), keep, count).to(flat.device)] = False
        return new

    names = list(layers)
    scores = torch.cat([layers[name].weight.detach().abs().flatten().double().cpu() for name in names])
    keep_all = torch.cat([new[name].flatten().cpu() for name in names])
    count = round(fraction * int(keep_all.sum()))
    pruned = torch.zeros_like(keep_all)
    pruned[_lowest_kept(scores, keep_all, count)] = True
    offset = 0
    for name in names:
        size = new[name].numel()
        new[name].view(-1)[pruned[offset:offset + size].to(new[name].device)] = False
        offset += size
    return new


@torch.no_grad()
def apply_masks(layers: Mapping[str, nn.Module], masks: Mapping[str, Tensor]) -> None:
    """Zero the pruned weights in place."""
    for name, layer in layers.items():
        layer.weight.mul_(masks[name].to(layer.weight.device, layer.weight.dtype))
