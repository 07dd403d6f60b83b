"""Which attention units and FFN neurons to remove so that a target of MACs is removed, given their scores.

Units are scored per block: ``head_scores`` ``[n_layers, n_head_units]`` (a head, or a key/value group under
grouped-query attention) and ``neuron_scores`` ``[n_layers, n_neurons]``; a lower score is removed first. One head
unit costs ``head_cost`` MACs and one neuron ``neuron_cost`` (``post_training.flops_budget.unit_costs``), and the
target is a number of MACs to remove, ``target_sparsity * dense``, the same constraint as mask_search's budget, so the
methods compare at equal block FLOPs removed.

Two ways to spread the removal:

* ``global_selection`` (FLAP's adaptive structure): one ranking of every unit of every block, heads and neurons
  together, removed in increasing score until the removed MACs reach the target: the shortest such prefix, so it
  overshoots by less than the last unit's cost. Ties go by position: head units before neurons, then block, then
  index.
* ``uniform_selection`` (Wanda-sp and magnitude, as FLAP's reference runs them): every block removes the same
  numbers: ``int(target_sparsity * n_head_units)`` head units (the reference's truncation; one more at a time while
  the neurons cannot make up the rest), then the fewest neurons that bring the block's removed MACs to
  ``target_sparsity`` of its own; the lowest-scored of each, ties by index.

Both keep at least one head unit and one neuron in every block (a unit that would be the last of its kind in its
block is skipped and the ranking goes on), so no block loses a whole sub-layer. A target those survivors make
unreachable raises ValueError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["UnitSelection", "global_selection", "unit_sums", "uniform_selection"]


@dataclass(frozen=True)
class UnitSelection:
    """Bool keep masks (True = kept): ``head_keep`` ``[n_layers, n_head_units]``, ``neuron_keep``
    ``[n_layers, n_neurons]``, and the MACs they remove."""

    head_keep: torch.Tensor
    neuron_keep: torch.Tensor
    removed_cost: int


def unit_sums(channel_scores: torch.Tensor, channels_per_unit: int) -> torch.Tensor:
    """``[..., channels]`` -> ``[..., channels / channels_per_unit]``: each unit's channels (consecutive, as the
    head-major layout of an attention output projection's input puts them) summed."""
    if channel_scores.shape[-1] % channels_per_unit:
        raise ValueError(f"{channel_scores.shape[-1]} channels cannot be split into units of {channels_per_unit}")
    return channel_scores.unflatten(-1, (-1, channels_per_unit)).sum(dim=-1)


def _check(head_scores: torch.Tensor, neuron_scores: torch.Tensor, head_cost: int, neuron_cost: int) -> None:
    if head_scores.dim() != 2 or neuron_scores.dim() != 2 or head_scores.shape[0] != neuron_scores.shape[0]:
        raise ValueError(f"expected head_scores [n_layers, n_head_units] and neuron_scores [n_layers, n_neurons] with "
                         f"the same n_layers, got {list(head_scores.shape)} and {list(neuron_scores.shape)}")
    if not (torch.isfinite(head_scores).all() and torch.isfinite(neuron_scores).all()):
        raise ValueError("unit scores hold NaN or Inf: the calibration statistics or the weights are not finite")
    if head_cost <= 0 or neuron_cost <= 0:
        raise ValueError(f"unit costs must be positive MACs, got head {head_cost}, neuron {neuron_cost}")


def _unreachable(target: float, removable: int) -> ValueError:
    return ValueError(f"removing {target:.6g} MACs is not possible while every block keeps one head unit and one "
                      f"neuron: at most {removable} can go; lower target_sparsity")


def global_selection(head_scores: torch.Tensor, neuron_scores: torch.Tensor, head_cost: int, neuron_cost: int,
                     target: float) -> UnitSelection:
    """Remove units in increasing score across all blocks until ``target`` MACs are removed (module docstring)."""
    _check(head_scores, neuron_scores, head_cost, neuron_cost)
    n_layers, n_units = head_scores.shape
    n_neurons = neuron_scores.shape[1]
    scores = torch.cat([head_scores.flatten(), neuron_scores.flatten()]).double()
    order = torch.sort(scores, stable=True).indices.tolist()
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    left = {("head", layer): n_units for layer in range(n_layers)} | {
        ("neuron", layer): n_neurons for layer in range(n_layers)}
    removed, head_units = 0, n_layers * n_units
    for index in order:
        if removed >= target:
            break
        kind, layer, cost = (("head", index // n_units, head_cost) if index < head_units
                             else ("neuron", (index - head_units) // n_neurons, neuron_cost))
        if left[kind, layer] == 1:
            continue  # the block's last unit of this kind stays
        left[kind, layer] -= 1
        keep[index] = False
        removed += cost
    if removed < target:
        raise _unreachable(target, removed)
    return UnitSelection(keep[:head_units].reshape(n_layers, n_units), keep[head_units:].reshape(n_layers, n_neurons),
                         removed)


def _lowest_removed(scores: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.sort(scores, stable=True).indices[:count]] = False
    return keep


def _neurons_to_reach(rest: float, neuron_cost: int) -> int:
    """The fewest neurons whose MACs reach ``rest`` (0 when nothing is left to remove)."""
    neurons = max(0, math.ceil(rest / neuron_cost))
    while neurons > 0 and (neurons - 1) * neuron_cost >= rest:
        neurons -= 1  # (float rounding of the division)
    while neurons * neuron_cost < rest:
        neurons += 1
    return neurons


def uniform_selection(head_scores: torch.Tensor, neuron_scores: torch.Tensor, head_cost: int, neuron_cost: int,
                      target_sparsity: float) -> UnitSelection:
    """The same numbers of head units and neurons removed from every block, each block's lowest-scored ones
    (module docstring)."""
    _check(head_scores, neuron_scores, head_cost, neuron_cost)
    n_layers, n_units = head_scores.shape
    n_neurons = neuron_scores.shape[1]
    block_target = target_sparsity * (n_units * head_cost + n_neurons * neuron_cost)
    heads = min(int(target_sparsity * n_units), n_units - 1)
    neurons = _neurons_to_reach(block_target - heads * head_cost, neuron_cost)
    while neurons > n_neurons - 1 and heads < n_units - 1:  # the neurons cannot make up the rest: one more head
        heads += 1
        neurons = _neurons_to_reach(block_target - heads * head_cost, neuron_cost)
    if neurons > n_neurons - 1:
        raise _unreachable(n_layers * block_target, n_layers * (heads * head_cost + (n_neurons - 1) * neuron_cost))
    head_keep = torch.stack([_lowest_removed(row, heads) for row in head_scores])
    neuron_keep = torch.stack([_lowest_removed(row, neurons) for row in neuron_scores])
    return UnitSelection(head_keep, neuron_keep, n_layers * (heads * head_cost + neurons * neuron_cost))
