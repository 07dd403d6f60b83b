"""Channel selection shared by network slimming (``|gamma|``) and network trimming (APoZ): keep masks that prune the
channels with the lowest scores, per layer or ranked across layers, never emptying a layer."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"fraction of channels to prune must be a number in [0, 1), got {fraction!r}")


def prune_lowest_channels(scores: Mapping[str, Tensor], fraction: float, scope: str = "global") -> dict[str, Tensor]:
    """{name: keep mask [C] bool}: prune the channels with the lowest scores.

    ``scope="local"``: ``int(fraction * C)`` per layer (never all of them, since fraction < 1).
    ``scope="global"``: ``int(fraction * total)`` across layers, ranked together, at least one channel kept per
    layer; raises ValueError when that count cannot be reached without emptying a layer.
    Ties are broken by layer order, then channel index (lower first), so results are deterministic.
    """
    _check_fraction(fraction)
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be 'local' (per layer) or 'global' (across layers), got {scope!r}")
    if not scores:
        raise ValueError("no channels to select from")
    keep = {name: torch.ones(values.numel(), dtype=torch.bool) for name, values in scores.items()}
    if scope == "local":
        for name, values in scores.items():
            count = int(fraction * values.numel())
            order = torch.sort(values.detach().flatten().double().cpu(), stable=True).indices
            keep[name][order[:count]] = False
        return keep

    names = list(scores)
    sizes = [scores[name].numel() for name in names]
    total = sum(sizes)
    count = int(fraction * total)
    prunable = total - len(names)
    if count > prunable:
        raise ValueError(
            f"pruning {count} of {total} channels (fraction {fraction}) would remove every channel of some layer: "
            f"at most {prunable} can be pruned while keeping one channel in each of the {len(names)} layers"
        )
    flat = torch.cat([scores[name].detach().flatten().double().cpu() for name in names])
    layer_of = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes))
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    pruned = [0] * len(names)
    done = 0
    for position in torch.sort(flat, stable=True).indices.tolist():
        if done == count:
            break
        layer = int(layer_of[position])
        if pruned[layer] == sizes[layer] - 1:
            continue  # the layer's last channel stays
        keep[names[layer]][position - int(offsets[layer])] = False
        pruned[layer] += 1
        done += 1
    return keep
