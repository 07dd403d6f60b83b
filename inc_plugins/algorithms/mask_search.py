"""Constrained mask search over attention heads and FFN neurons (Kwon et al. 2022, section 4.1, Algorithm 1).

Importance of a unit is its diagonal Fisher information (``fisher.diagonal_fisher``), and the importance of a
mask is the sum over its kept units: the search maximises that sum under a cost budget.

MAC budget (``search_masks_under_macs``): every head costs the same and every neuron costs the same
(``mac_cost``), so for a fixed number h of kept heads the best heads are the h most important ones in the whole
model, and the leftover budget is best spent on the most important neurons. Trying every h is therefore exact:
the result maximises retained importance over *all* masks that fit the budget, not only over the masks
Algorithm 1 enumerates (importance is non-negative, so filling the leftover can never hurt).

Latency budget (``search_masks_under_latency``): measured latency is not linear in the number of units. The paper
fits each lookup table (LUT) with a function that is flat up to a threshold T and linear beyond it. Keeping any
unit of a layer costs the flat part, so each surviving layer keeps its T most important units, whole layers can
be dropped (least important first) to save the flat part, and the units beyond T are ranked globally, as in the
MAC search. This is a heuristic, not an exact optimum.
"""

from dataclasses import dataclass

import torch

from .mac_cost import head_macs, neuron_macs

__all__ = [
    "search_masks_under_unit_costs",
    "search_masks_under_macs",
    "PiecewiseLinearLatency",
    "fit_piecewise_linear_latency",
    "search_masks_under_latency",
]


def _check_importance(head_importance: torch.Tensor, neuron_importance: torch.Tensor) -> None:
    for name, scores in (("head_importance", head_importance), ("neuron_importance", neuron_importance)):
        if scores.dim() != 2 or scores.numel() == 0:
            raise ValueError(f"{name} must be a non-empty [n_layers, n_units] tensor, got {tuple(scores.shape)}")
        if not torch.isfinite(scores).all() or (scores < 0).any():
            raise ValueError(f"{name} must be finite and >= 0 (a sum of squared gradients)")
    if head_importance.shape[0] != neuron_importance.shape[0]:
        raise ValueError(
            f"head_importance has {head_importance.shape[0]} layers, neuron_importance has "
            f"{neuron_importance.shape[0]}"
        )


def _check_budget(name: str, budget: float, minimum: float, dense: float, unit: str) -> None:
    budget = float(budget)
    if not minimum <= budget <= dense:  # also rejects NaN
        raise ValueError(
            f"{name}={budget!r} {unit} cannot be met: the minimum achievable is {minimum!r} {unit} "
            f"(everything pruned) and the dense model costs {dense!r} {unit} (a budget at the dense cost "
            f"prunes nothing). Pass an absolute budget in that range, e.g. a fraction of the dense cost."
        )


def _descending(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort descending; equal values keep their index order so masks are deterministic."""
    return torch.sort(values, descending=True, stable=True)


def _prefix_sums(sorted_values: torch.Tensor) -> torch.Tensor:
    """[n] -> [n + 1]: entry j is the sum of the first j values."""
    return torch.cat([sorted_values.new_zeros(1), sorted_values.cumsum(0)])


def _mask_from_flat(indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    mask = torch.zeros(shape.numel(), dtype=torch.bool)
    mask[indices] = True
    return mask.view(shape)


def search_masks_under_unit_costs(
    head_importance: torch.Tensor,
    neuron_importance: torch.Tensor,
    budget: float,
    per_head: float,
    per_neuron: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks with the largest retained importance whose cost fits ``budget``, when every head unit costs
    ``per_head`` and every neuron ``per_neuron`` (any unit: MACs, seconds, ...).

    ``head_importance``: [n_layers, n_heads], ``neuron_importance``: [n_layers, n_neurons], both >= 0. ``budget`` in
    ``[0, dense cost]``. Returns boolean (head_mask [n_layers, n_heads], neuron_mask [n_layers, n_neurons]).
    Ties: among equal-importance units the lower flat index is kept; among equal totals, fewer heads.
    """
    _check_importance(head_importance, neuron_importance)
    dense = head_importance.numel() * per_head + neuron_importance.numel() * per_neuron
    _check_budget("budget", budget, 0.0, float(dense), "cost units")

    head_scores, head_order = _descending(head_importance.flatten().double())
    neuron_scores, neuron_order = _descending(neuron_importance.flatten().double())
    head_prefix, neuron_prefix = _prefix_sums(head_scores), _prefix_sums(neuron_scores)

    n_heads = torch.arange(head_order.numel() + 1)
    leftover = float(budget) - n_heads.double() * per_head
    n_neurons = torch.floor(leftover / per_neuron).clamp(0, neuron_order.numel()).long()
    retained = head_prefix[n_heads] + neuron_prefix[n_neurons]
    retained[leftover < 0] = -torch.inf  # these head counts alone exceed the budget
    best = int(torch.argmax(retained))  # first maximum: fewest heads among ties

    head_mask = _mask_from_flat(head_order[:best], head_importance.shape)
    neuron_mask = _mask_from_flat(neuron_order[: int(n_neurons[best])], neuron_importance.shape)
    return head_mask, neuron_mask


def search_masks_under_macs(
    head_importance: torch.Tensor,
    neuron_importance: torch.Tensor,
    mac_budget: float,
    seq_len: int,
    hidden_size: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``search_masks_under_unit_costs`` with the paper's MAC costs of a head and a neuron (``mac_cost``).

    ``mac_budget``: MACs per sequence of ``seq_len`` tokens for the prunable parts, in ``[0, dense MACs]``.
    """
    per_head, per_neuron = head_macs(seq_len, hidden_size, head_dim), neuron_macs(seq_len, hidden_size)
    _check_importance(head_importance, neuron_importance)
    dense = head_importance.numel() * per_head + neuron_importance.numel() * per_neuron
    _check_budget("mac_budget", mac_budget, 0.0, float(dense), "MACs")
    return search_masks_under_unit_costs(head_importance, neuron_importance, mac_budget, per_head, per_neuron)


@dataclass(frozen=True)
class PiecewiseLinearLatency:
    """Latency model of one module for n >= 1 kept units: ``flat`` if n <= threshold, else
    ``flat + slope * (n - threshold)``. Seconds, and seconds per unit."""

    threshold: int
    flat: float
    slope: float


def _check_lut(name: str, lut: torch.Tensor, n_units: int) -> torch.Tensor:
    lut = torch.as_tensor(lut, dtype=torch.float64)
    if lut.dim() != 1 or lut.numel() != n_units + 1:
        raise ValueError(
            f"{name} must be 1-D with {n_units + 1} entries (latency in seconds for 0..{n_units} kept units), "
            f"got shape {tuple(lut.shape)}"
        )
    if not torch.isfinite(lut).all() or (lut < 0).any():
        raise ValueError(f"{name} must hold finite latencies >= 0 seconds")
    return lut


def fit_piecewise_linear_latency(lut: torch.Tensor) -> PiecewiseLinearLatency:
    """Least-squares fit of a flat-then-linear function to ``lut[1:]`` (latency for 1..n kept units).

    ``lut``: [n_units + 1] seconds, ``lut[k]`` the latency with k units kept (``lut[0]`` is not fitted: a module
    with no units is skipped). For each threshold T the flat part is the mean of the first T entries and the
    slope is fitted through the end of the flat part, clamped at 0 (latency does not fall with more units).
    The T with the smallest squared error wins; ties go to the smaller T.
    """
    lut = torch.as_tensor(lut, dtype=torch.float64)
    if lut.dim() != 1 or lut.numel() < 2 or not torch.isfinite(lut).all():
        raise ValueError(f"lut must be a finite 1-D tensor with at least 2 entries, got shape {tuple(lut.shape)}")
    measured = lut[1:]
    n = measured.numel()
    best, best_error = None, torch.inf
    for threshold in range(1, n + 1):
        flat = float(measured[:threshold].mean())
        steps = torch.arange(1, n - threshold + 1, dtype=torch.float64)
        rise = measured[threshold:] - flat
        slope = max(float((steps * rise).sum() / (steps * steps).sum()), 0.0) if threshold < n else 0.0
        fitted = torch.cat([torch.full((threshold,), flat, dtype=torch.float64), flat + slope * steps])
        error = float(((measured - fitted) ** 2).sum())
        if error < best_error:
            best, best_error = PiecewiseLinearLatency(threshold, flat, slope), error
    return best


@dataclass(frozen=True)
class _Ladder:
    """Candidate masks of one module type (heads or neurons) for one set of surviving layers.

    Entry j of ``importance``/``latency`` describes the mask keeping the base units of every surviving layer
    plus the first j units of ``extra_order``; ``latency`` is a running maximum, so it can be searched and
    never underestimates the LUT.
    """

    base_units: torch.Tensor  # flat indices of the base units of surviving layers
    extra_order: torch.Tensor  # flat indices beyond the base, most important first
    importance: torch.Tensor  # [len(extra_order) + 1]
    latency: torch.Tensor  # [len(extra_order) + 1] seconds


def _ladders(importance: torch.Tensor, lut: torch.Tensor) -> list[_Ladder]:
    """One ladder per number of dropped layers, 0..n_layers; layers with the least base importance go first."""
    n_layers, n_units = importance.shape
    importance = importance.double()
    base_size = min(fit_piecewise_linear_latency(lut).threshold, n_units)
    local_scores, local_order = _descending(importance)
    flat_index = local_order + torch.arange(n_layers).unsqueeze(1) * n_units
    base_importance = local_scores[:, :base_size].sum(dim=1)
    _, drop_order = torch.sort(base_importance, stable=True)

    extra_scores, extra_rank = _descending(local_scores[:, base_size:].flatten())
    extra_flat = flat_index[:, base_size:].flatten()[extra_rank]
    extra_layer = extra_flat // n_units

    ladders = []
    for dropped in range(n_layers + 1):
        survives = torch.ones(n_layers, dtype=torch.bool)
        survives[drop_order[:dropped]] = False
        in_survivor = survives[extra_layer]
        order, layer = extra_flat[in_survivor], extra_layer[in_survivor]
        counts = torch.zeros(order.numel() + 1, n_layers, dtype=torch.long)
        counts[1:] = torch.nn.functional.one_hot(layer, n_layers).cumsum(dim=0)
        counts += survives.long() * base_size
        latency = lut[counts].sum(dim=1).cummax(dim=0).values
        ladders.append(
            _Ladder(
                base_units=flat_index[survives, :base_size].flatten(),
                extra_order=order,
                importance=base_importance[survives].sum() + _prefix_sums(extra_scores[in_survivor]),
                latency=latency,
            )
        )
    return ladders


def search_masks_under_latency(
    head_importance: torch.Tensor,
    neuron_importance: torch.Tensor,
    latency_budget: float,
    head_latency: torch.Tensor,
    neuron_latency: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks with large retained importance whose LUT latency fits ``latency_budget`` seconds.

    ``head_importance``: [n_layers, n_heads]; ``neuron_importance``: [n_layers, n_neurons], both >= 0.
    ``head_latency``: [n_heads + 1] seconds of one layer's attention with 0..n_heads heads kept;
    ``neuron_latency``: [n_neurons + 1] seconds of one layer's FFN with 0..n_neurons neurons kept. One LUT serves
    every layer (identical layers, as in the paper). Model latency = sum over layers of both LUT entries.

    The piecewise-linear fit only decides T, the units every surviving layer keeps. Unlike the reference code,
    which budgets with the fitted line, every candidate is costed with the LUT itself (made non-decreasing by a
    running maximum), so the returned masks never exceed the budget under the LUT.
    Returns boolean (head_mask [n_layers, n_heads], neuron_mask [n_layers, n_neurons]).
    """
    _check_importance(head_importance, neuron_importance)
    n_layers, n_heads = head_importance.shape
    n_neurons = neuron_importance.shape[1]
    head_latency = _check_lut("head_latency", head_latency, n_heads)
    neuron_latency = _check_lut("neuron_latency", neuron_latency, n_neurons)
    minimum = n_layers * float(head_latency[0] + neuron_latency[0])
    dense = n_layers * float(head_latency[-1] + neuron_latency[-1])
    _check_budget("latency_budget", latency_budget, minimum, max(dense, minimum), "seconds")

    head_ladders = _ladders(head_importance, head_latency)
    neuron_ladders = _ladders(neuron_importance, neuron_latency)
    best_value, best = -torch.inf, None
    for heads in head_ladders:
        for neurons in neuron_ladders:
            leftover = float(latency_budget) - heads.latency
            n_extra = torch.searchsorted(neurons.latency, leftover, right=True) - 1
            feasible = n_extra >= 0
            if not feasible.any():
                continue
            retained = heads.importance + neurons.importance[n_extra.clamp(min=0)]
            retained[~feasible] = -torch.inf
            h = int(torch.argmax(retained))
            if retained[h] > best_value:
                best_value, best = retained[h], (heads, h, neurons, int(n_extra[h]))

    heads, h, neurons, k = best
    head_mask = _mask_from_flat(torch.cat([heads.base_units, heads.extra_order[:h]]), head_importance.shape)
    neuron_mask = _mask_from_flat(torch.cat([neurons.base_units, neurons.extra_order[:k]]), neuron_importance.shape)
    return head_mask, neuron_mask
