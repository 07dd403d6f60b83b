"""Diagonal Fisher accumulation of mask gradients."""

import pytest
import torch

from inc_plugins.algorithms.fisher import FisherAccumulator, diagonal_fisher


def test_importance_is_sum_of_squares_over_all_vectors():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, generator=gen) for _ in range(3)]
    per_sample = torch.randn(4, 2, 3, generator=gen)
    acc = FisherAccumulator()
    for grad in batches:
        acc.add(grad)
    acc.add(per_sample, per_sample=True)

    all_vectors = torch.cat([torch.stack(batches), per_sample])
    assert len(acc) == 7
    assert torch.equal(acc.grads(), all_vectors)
    torch.testing.assert_close(acc.importance(), all_vectors.double().pow(2).sum(0))
    assert acc.importance().dtype == torch.float64


def test_recorded_gradients_are_copies():
    grad = torch.ones(2, 2)
    acc = FisherAccumulator()
    acc.add(grad)
    grad.zero_()
    assert acc.importance().sum() == 4


def test_shape_change_nan_and_empty_raise():
    acc = FisherAccumulator()
    with pytest.raises(ValueError, match="no gradients recorded"):
        acc.grads()
    acc.add(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(3, 2\) does not match the mask shape \(2, 3\)"):
        acc.add(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="NaN or inf"):
        acc.add(torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="n_samples >= 1"):
        acc.add(torch.zeros(0, 2, 3), per_sample=True)
    with pytest.raises(ValueError, match="n_vectors >= 1"):
        diagonal_fisher(torch.zeros(5))
