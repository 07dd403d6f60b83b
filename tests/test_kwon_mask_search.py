"""MAC- and latency-constrained mask search against brute force on toy models."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inc_plugins.algorithms.mac_cost import head_macs, model_macs, neuron_macs
from inc_plugins.algorithms.mask_search import (
    PiecewiseLinearLatency,
    fit_piecewise_linear_latency,
    search_masks_under_latency,
    search_masks_under_macs,
)

# Toy model: 2 layers, 3 heads, 4 neurons -> 14 mask bits, 16384 masks to enumerate.
N_LAYERS, N_HEADS, N_NEURONS = 2, 3, 4
SEQ_LEN, HIDDEN, HEAD_DIM = 4, 6, 2
HEAD_COST, NEURON_COST = head_macs(SEQ_LEN, HIDDEN, HEAD_DIM), neuron_macs(SEQ_LEN, HIDDEN)
DENSE = N_LAYERS * (N_HEADS * HEAD_COST + N_NEURONS * NEURON_COST)
ALL_MASKS = (torch.arange(2**14).unsqueeze(1) >> torch.arange(14)) & 1  # [16384, 14]


def brute_force_best(head_importance, neuron_importance, head_cost, neuron_cost, budget):
    """Largest retained importance over every mask whose cost fits the budget."""
    importance = torch.cat([head_importance.flatten(), neuron_importance.flatten()]).double()
    unit_cost = torch.tensor([head_cost] * N_LAYERS * N_HEADS + [neuron_cost] * N_LAYERS * N_NEURONS).double()
    bits = ALL_MASKS.double()
    feasible = bits @ unit_cost <= budget
    return float((bits @ importance)[feasible].max())


def retained(head_importance, neuron_importance, head_mask, neuron_mask):
    return float(head_importance.double()[head_mask].sum() + neuron_importance.double()[neuron_mask].sum())


importances = st.integers(0, 2**32 - 1).map(
    lambda seed: (
        torch.rand(N_LAYERS, N_HEADS, generator=torch.Generator().manual_seed(seed)) * 4,
        torch.rand(N_LAYERS, N_NEURONS, generator=torch.Generator().manual_seed(seed + 1)),
    )
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(importances, st.floats(0.0, 1.0))
def test_mac_search_is_optimal_over_all_masks(scores, fraction):
    head_importance, neuron_importance = scores
    budget = fraction * DENSE
    head_mask, neuron_mask = search_masks_under_macs(
        head_importance, neuron_importance, budget, SEQ_LEN, HIDDEN, HEAD_DIM
    )
    assert head_mask.dtype == torch.bool and head_mask.shape == (N_LAYERS, N_HEADS)
    assert neuron_mask.dtype == torch.bool and neuron_mask.shape == (N_LAYERS, N_NEURONS)
    # Budget checked with the independent, matrix-by-matrix count.
    assert model_macs(head_mask, neuron_mask, SEQ_LEN, HIDDEN, HEAD_DIM) <= budget
    # Optimal over *all* 2^14 masks, not only over Algorithm 1's candidates.
    best = brute_force_best(head_importance, neuron_importance, HEAD_COST, NEURON_COST, budget)
    assert retained(head_importance, neuron_importance, head_mask, neuron_mask) == pytest.approx(best, abs=1e-9)


def test_mac_search_extremes_and_ties():
    scores_h, scores_n = torch.ones(N_LAYERS, N_HEADS), torch.ones(N_LAYERS, N_NEURONS)
    head_mask, neuron_mask = search_masks_under_macs(scores_h, scores_n, DENSE, SEQ_LEN, HIDDEN, HEAD_DIM)
    assert head_mask.all() and neuron_mask.all()
    head_mask, neuron_mask = search_masks_under_macs(scores_h, scores_n, 0, SEQ_LEN, HIDDEN, HEAD_DIM)
    assert not head_mask.any() and not neuron_mask.any()
    # The budget buys 3 neurons and no head; among equally important neurons the lowest flat indices win.
    head_mask, neuron_mask = search_masks_under_macs(
        torch.zeros(N_LAYERS, N_HEADS), scores_n, 3 * NEURON_COST + 1, SEQ_LEN, HIDDEN, HEAD_DIM
    )
    assert not head_mask.any()
    assert neuron_mask.tolist() == [[True, True, True, False], [False] * 4]


@pytest.mark.parametrize(
    "budget, message",
    [
        (-1.0, r"mac_budget=-1.0 MACs cannot be met: the minimum achievable is 0.0 MACs"),
        (DENSE + 1, rf"dense model costs {float(DENSE)!r} MACs"),
        (math.nan, "cannot be met"),
    ],
)
def test_mac_search_rejects_budgets_out_of_range(budget, message):
    with pytest.raises(ValueError, match=message):
        search_masks_under_macs(
            torch.ones(N_LAYERS, N_HEADS), torch.ones(N_LAYERS, N_NEURONS), budget, SEQ_LEN, HIDDEN, HEAD_DIM
        )


@pytest.mark.parametrize(
    "head_importance, neuron_importance, message",
    [
        (torch.ones(3), torch.ones(2, 4), r"head_importance must be a non-empty \[n_layers, n_units\]"),
        (torch.ones(2, 3), -torch.ones(2, 4), "neuron_importance must be finite and >= 0"),
        (torch.ones(2, 3), torch.ones(3, 4), "head_importance has 2 layers, neuron_importance has 3"),
    ],
)
def test_search_rejects_bad_importance(head_importance, neuron_importance, message):
    with pytest.raises(ValueError, match=message):
        search_masks_under_macs(head_importance, neuron_importance, 0, SEQ_LEN, HIDDEN, HEAD_DIM)
    with pytest.raises(ValueError, match=message):
        search_masks_under_latency(head_importance, neuron_importance, 0.0, torch.zeros(4), torch.zeros(5))


def test_fit_recovers_exact_piecewise_linear_lut():
    lut = torch.tensor([0.0, 2, 2, 2, 2.5, 3.0, 3.5])  # flat 2 s up to 3 units, then +0.5 s per unit
    assert fit_piecewise_linear_latency(lut) == PiecewiseLinearLatency(threshold=3, flat=2.0, slope=0.5)
    # A flat LUT fits exactly with any threshold and slope 0: ties go to the smallest threshold.
    assert fit_piecewise_linear_latency(torch.tensor([0.0, 1, 1, 1])) == PiecewiseLinearLatency(1, 1.0, 0.0)


def lut_latency(head_mask, neuron_mask, head_lut, neuron_lut):
    return float(head_lut[head_mask.sum(1)].sum() + neuron_lut[neuron_mask.sum(1)].sum())


def synthetic_lut(n_units, threshold, flat, slope, noise, gen):
    counts = torch.arange(n_units + 1, dtype=torch.float64)
    lut = flat + slope * (counts - threshold).clamp(min=0)
    lut = lut + noise * torch.rand(n_units + 1, generator=gen, dtype=torch.float64)
    lut[0] = 0.0
    return lut


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, N_HEADS),
    st.integers(1, N_NEURONS),
    st.floats(0.0, 0.5),
    st.floats(0.0, 1.0),
)
def test_latency_search_respects_budget_on_lut(seed, head_threshold, neuron_threshold, noise, fraction):
    gen = torch.Generator().manual_seed(seed)
    head_importance, neuron_importance = torch.rand(N_LAYERS, N_HEADS, generator=gen), torch.rand(
        N_LAYERS, N_NEURONS, generator=gen
    )
    head_lut = synthetic_lut(N_HEADS, head_threshold, 1.0, 0.3, noise, gen)
    neuron_lut = synthetic_lut(N_NEURONS, neuron_threshold, 0.8, 0.1, noise, gen)
    dense = N_LAYERS * float(head_lut[-1] + neuron_lut[-1])
    budget = fraction * dense
    head_mask, neuron_mask = search_masks_under_latency(
        head_importance, neuron_importance, budget, head_lut, neuron_lut
    )
    assert lut_latency(head_mask, neuron_mask, head_lut, neuron_lut) <= budget + 1e-12  # summation order
    # The smallest non-empty candidate of the search: one layer keeping the fitted T units of one module.
    cheapest = min(
        float(N_LAYERS * (own[0] + other[0]) - own[0] + own[: fit_piecewise_linear_latency(own).threshold + 1].max())
        for own, other in ((head_lut, neuron_lut), (neuron_lut, head_lut))
    )
    if budget >= cheapest + 1e-12:
        assert head_mask.any() or neuron_mask.any()


@settings(max_examples=30, deadline=None, derandomize=True)
@given(importances, st.floats(0.0, 1.0))
def test_latency_search_is_exact_for_linear_luts(scores, fraction):
    # With latency linear in the unit count (T = 1), every global top-h set is one of the search's candidates,
    # so the heuristic coincides with the exact knapsack optimum over all masks.
    head_importance, neuron_importance = scores
    # Costs that are exact in binary floating point, so that summation order cannot decide feasibility.
    head_lut = 0.75 * torch.arange(N_HEADS + 1, dtype=torch.float64)
    neuron_lut = 0.25 * torch.arange(N_NEURONS + 1, dtype=torch.float64)
    budget = fraction * N_LAYERS * (N_HEADS * 0.75 + N_NEURONS * 0.25)
    head_mask, neuron_mask = search_masks_under_latency(
        head_importance, neuron_importance, budget, head_lut, neuron_lut
    )
    assert lut_latency(head_mask, neuron_mask, head_lut, neuron_lut) <= budget
    best = brute_force_best(head_importance, neuron_importance, 0.75, 0.25, budget)
    assert retained(head_importance, neuron_importance, head_mask, neuron_mask) == pytest.approx(best, abs=1e-9)


def test_latency_search_drops_whole_layers_when_flat_cost_exceeds_budget():
    head_lut = torch.tensor([0.0, 1.0, 1.0, 1.0])  # any kept head costs 1 s
    neuron_lut = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])
    head_importance = torch.tensor([[5.0, 0.1, 0.1], [1.0, 1.0, 1.0]])
    neuron_importance = torch.tensor([[0.1] * 4, [0.2] * 4])
    head_mask, neuron_mask = search_masks_under_latency(
        head_importance, neuron_importance, 2.0, head_lut, neuron_lut
    )
    # Two modules fit: attention of layer 0 (5.2) and of layer 1 (3.0) beat any FFN (<= 0.8).
    assert head_mask.all() and not neuron_mask.any()


def test_latency_search_rejects_bad_budget_and_lut():
    scores_h, scores_n = torch.ones(N_LAYERS, N_HEADS), torch.ones(N_LAYERS, N_NEURONS)
    head_lut = torch.tensor([0.1, 1.0, 1.0, 1.0])  # 0.1 s even with no head kept
    neuron_lut = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"latency_budget=0.1 seconds cannot be met: the minimum achievable is 0.2"):
        search_masks_under_latency(scores_h, scores_n, 0.1, head_lut, neuron_lut)
    with pytest.raises(ValueError, match=r"head_latency must be 1-D with 4 entries"):
        search_masks_under_latency(scores_h, scores_n, 1.0, head_lut[:3], neuron_lut)
    with pytest.raises(ValueError, match=r"neuron_latency must hold finite latencies >= 0"):
        search_masks_under_latency(scores_h, scores_n, 1.0, head_lut, -neuron_lut)
