"""Damped least-squares mask scales and their safeguards."""

import pytest
import torch

from inc_plugins.algorithms.mask_tuning import (choose_mask_scales, normal_equations, residual_sum_of_squares,
                                                solve_mask_scales)


def contributions(n_kept=5, n_outputs=300, seed=0):
    return torch.randn(n_kept, n_outputs, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_recovers_known_scales_from_batches():
    true_scales = torch.tensor([1.5, 0.5, 1.0, 2.0, -0.8], dtype=torch.float64)
    batches = [contributions(seed=s) for s in range(3)]
    gram, rhs = map(sum, zip(*(normal_equations(a, true_scales @ a) for a in batches)))
    solution = solve_mask_scales(gram, rhs)
    assert solution.accepted and solution.reason == ""
    # Damping biases the solution towards 1 by about damp / eigenvalue(gram) ~ 1e-5 here.
    torch.testing.assert_close(solution.scales, true_scales, atol=1e-3, rtol=0)
    undamped = solve_mask_scales(gram, rhs, damp=0.0)
    torch.testing.assert_close(undamped.scales, true_scales, atol=1e-8, rtol=0)


def test_damping_pulls_ill_posed_scales_towards_one():
    # Collinear units: s0 + 2 s1 = 3 has a line of exact solutions. Damping the change from 1 picks (1, 1),
    # the untuned mask, where damping towards 0 would pick (0.6, 1.2).
    x = contributions(n_kept=1)[0]
    solution = solve_mask_scales(*normal_equations(torch.stack([x, 2 * x]), 3 * x))
    assert solution.accepted
    torch.testing.assert_close(solution.scales, torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_huge_scales_are_rejected_and_fall_back_to_one():
    a = contributions(n_kept=3)
    solution = solve_mask_scales(*normal_equations(a, torch.tensor([50.0, 1.0, 1.0], dtype=torch.float64) @ a))
    assert not solution.accepted
    assert "scales out of range: max |scale| 50" in solution.reason
    assert torch.equal(solution.scales, torch.ones(3, dtype=torch.float64))
    # A looser range accepts the same solve.
    assert solve_mask_scales(*normal_equations(a, 50 * a[0] + a[1] + a[2]), max_abs_scale=100).accepted


def test_non_converged_solve_is_rejected():
    a = contributions(n_kept=6)
    gram, rhs = normal_equations(a, torch.linspace(0.5, 2, 6, dtype=torch.float64) @ a)
    solution = solve_mask_scales(gram, rhs, max_iter=1)
    assert not solution.accepted and solution.lsmr_istop == 7
    assert "did not converge (istop=7)" in solution.reason
    assert torch.equal(solution.scales, torch.ones(6, dtype=torch.float64))


def test_residual_sum_of_squares_from_normal_equations_matches_the_explicit_residual():
    a, b = contributions(n_kept=4), contributions(n_kept=1, seed=9)[0]
    scales = torch.tensor([0.3, 1.7, -0.4, 1.0], dtype=torch.float64)
    gram, rhs = normal_equations(a, b)
    explicit = float((scales @ a - b).square().sum())
    assert residual_sum_of_squares(gram, rhs, float(b.square().sum()), scales) == pytest.approx(explicit, rel=1e-9)


def test_held_out_samples_keep_scales_that_transfer_and_refuse_those_that_do_not():
    fit_a, held_a = contributions(seed=1), contributions(seed=2)
    true_scales = torch.tensor([1.5, 0.5, 1.0, 2.0, 0.8], dtype=torch.float64)
    fit = normal_equations(fit_a, true_scales @ fit_a)

    def heldout(scales):
        target = scales @ held_a
        return (*normal_equations(held_a, target), float(target.square().sum()))

    transfers = choose_mask_scales(fit, heldout(true_scales))
    assert transfers.accepted and transfers.heldout_error_tuned < 1e-6 < transfers.heldout_error_untuned
    # held-out samples that the untuned mask already reconstructs: the fitted scales only make them worse
    overfits = choose_mask_scales(fit, heldout(torch.ones(5, dtype=torch.float64)))
    assert not overfits.accepted and overfits.reason.startswith("held-out error would rise: ")
    assert torch.equal(overfits.scales, torch.ones(5, dtype=torch.float64))
    # without held-out samples the safeguards alone decide
    assert choose_mask_scales(fit, None).accepted and choose_mask_scales(fit, None).heldout_error_untuned is None


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: normal_equations(torch.ones(2, 5), torch.ones(4)), r"expected contributions \[n_kept, n_outputs\]"),
        (lambda: normal_equations(torch.ones(0, 5), torch.ones(5)), "no kept units"),
        (lambda: normal_equations(torch.ones(2, 2), torch.tensor([1.0, float("nan")])), "NaN or inf"),
        (lambda: solve_mask_scales(torch.ones(2, 3), torch.ones(2)), r"expected gram \[n_kept, n_kept\]"),
        (lambda: solve_mask_scales(torch.eye(2), torch.ones(2), damp=-1.0), "damp must be >= 0"),
        (lambda: solve_mask_scales(torch.eye(2), torch.ones(2), max_abs_scale=0), "max_abs_scale must be > 0"),
    ],
)
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_ill_conditioned_but_well_posed_layers_converge():
    """Real layers' Gram matrices are ill-conditioned; LSMR needs more than n_kept iterations on them."""
    generator = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64))
    spread = torch.logspace(0, -2, 12, dtype=torch.float64)  # singular values over 2 decades
    a = basis @ torch.diag(spread) @ torch.randn(12, 400, generator=generator, dtype=torch.float64)
    true_scales = 1 + 0.5 * torch.randn(12, generator=generator, dtype=torch.float64)
    gram, rhs = normal_equations(a, true_scales @ a)
    assert not solve_mask_scales(gram, rhs, max_iter=12).accepted  # scipy's default limit: n_kept iterations
    assert solve_mask_scales(gram, rhs).accepted
