"""Greedy swap rearrangement under the block-diagonal Fisher objective."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inc_plugins.algorithms.rearrange import pruning_loss_proxy, rearrange_layer, rearrange_mask


def test_swap_fixes_diagonal_ranking_when_gradients_cancel():
    # Diagonal Fisher keeps unit 2 (1.44 > 1 = 1 ) and prunes 0 and 1, whose gradients add up:
    # loss ~ 1/2 * (1 + 1)^2 = 2. Pruning 0 and 2 instead cancels: 1/2 * (1 - 1.2)^2 = 0.02.
    grads = torch.tensor([[1.0, 1.0, -1.2]])
    mask = torch.tensor([False, False, True])
    assert pruning_loss_proxy(mask, grads) == pytest.approx(2.0)
    new_mask = rearrange_layer(mask, grads)
    assert new_mask.tolist() == [True, False, False]  # ties between unit 0 and 1 go to the lower index
    assert pruning_loss_proxy(new_mask, grads) == pytest.approx(0.02)


def test_zero_passes_and_full_or_empty_layers_are_untouched():
    grads = torch.tensor([[1.0, 1.0, -1.2]])
    mask = torch.tensor([False, False, True])
    assert torch.equal(rearrange_layer(mask, grads, max_passes=0), mask)
    for full in (torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)):
        assert torch.equal(rearrange_layer(full, grads), full)


layers = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(2, 6), st.integers(1, 5))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(layers)
def test_never_increases_objective_keeps_counts_and_ends_at_swap_local_optimum(case):
    seed, n_layers, n_units, n_vectors = case
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(n_vectors, n_layers, n_units, generator=gen)
    mask = torch.rand(n_layers, n_units, generator=gen) < 0.5
    new_mask = rearrange_mask(mask, grads, max_passes=100)
    assert new_mask.dtype == torch.bool
    assert torch.equal(new_mask.sum(1), mask.sum(1))
    for layer in range(n_layers):
        before = pruning_loss_proxy(mask[layer], grads[:, layer])
        after = pruning_loss_proxy(new_mask[layer], grads[:, layer])
        assert after <= before
        # Passes stop only when none swaps, so no single swap can improve the result.
        for p, k in itertools.product(range(n_units), repeat=2):
            if not new_mask[layer, p] and new_mask[layer, k]:
                swapped = new_mask[layer].clone()
                swapped[p], swapped[k] = True, False
                assert pruning_loss_proxy(swapped, grads[:, layer]) >= after - 1e-9


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"expected mask \[n_layers, n_units\]"):
        rearrange_mask(torch.ones(2, 3, dtype=torch.bool), torch.zeros(4, 2, 4))
    with pytest.raises(ValueError, match=r"expected mask \[n_units\] and grads \[n_vectors >= 1, n_units\]"):
        rearrange_layer(torch.ones(3, dtype=torch.bool), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="max_passes must be >= 0"):
        rearrange_layer(torch.tensor([True, False]), torch.ones(1, 2), max_passes=-1)
    with pytest.raises(ValueError, match="NaN or inf"):
        pruning_loss_proxy(torch.tensor([True, False]), torch.tensor([[1.0, float("inf")]]))
