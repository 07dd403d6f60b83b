"""Layer-wise mask tuning by damped least squares (Kwon et al. 2022, section 4.3).

After pruning, the kept units of a layer get real-valued mask scales s so that the pruned layer reproduces the
dense layer's output on calibration data. A layer's (attention or FFN) output is linear in the scales:

    output = sum_u s_u * contribution_u + fixed terms (bias, residual)

so with ``A`` [n_kept, n_outputs] holding each kept unit's contribution (flattened over tokens x hidden) and
``b`` [n_outputs] the dense output minus the fixed terms, the scales solve ``min_s |A^T s - b|^2``.

Calibration sets are too large to hold ``A`` for all tokens at once, so, like the reference code, the solve works
on the normal equations ``G = A A^T`` [n_kept, n_kept] and ``r = A b`` [n_kept], which add up over batches
(``normal_equations`` defines them from explicit contributions; ``post_training.mask_tuning.KeptUnitEquations``
builds the same sums from a layer's features without forming A. Sum them over batches, then call
``solve_mask_scales``).

Safeguards, as in the reference (``prune/rescale.py`` and ``utils/linalg.py``):

1. Solve for the change ``d = s - 1`` rather than s, with LSMR damping (``damp``, default 1): the damping pulls
   the solution towards s = 1, the untuned mask, instead of towards 0, which would silence the layer. As in the
   reference, LSMR runs on the normal equations, so it minimises ``|G d - (r - G 1)|^2 + damp^2 |d|^2``.
2. Reject the solve when LSMR reports no convergence: istop 3 or 6 (condition number too large) or 7 (iteration
   limit, 100,000 by default). The reference also rejects istop 4 and 5, which mean "converged to machine precision"; those are
   accepted here because they are the same outcomes as 1 and 2 with tighter tolerances.
3. Reject the solve when any scale is outside ``[-max_abs_scale, max_abs_scale]`` (default 10) or not finite:
   huge scales mean the least-squares problem is ill-posed and the fit would not transfer beyond the sample.

A rejected solve returns scales of 1.0 (the mask unchanged). The reference also stops tuning every later layer
after the first rejection; the caller decides that, reading ``ScaleSolution.accepted``.

4. (Not in the reference.) ``choose_mask_scales`` also asks held-out calibration samples, which the fit never saw:
   the scales are kept only when they lower the layer's reconstruction error there. A fit that lowers the error
   only on the samples it was fitted to does not transfer, so the layer keeps scales of 1. The error of scales s
   follows from the held-out normal equations alone: ``|A^T s - b|^2 = s^T G s - 2 s^T r + |b|^2``.
"""

from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.sparse.linalg import lsmr

__all__ = ["ScaleSolution", "choose_mask_scales", "normal_equations", "residual_sum_of_squares", "solve_mask_scales"]

_CONVERGED_ISTOP = frozenset({0, 1, 2, 4, 5})
# A sub-layer the mask already reconstructs (nothing of it pruned) has a held-out error at rounding level both
# untuned and tuned; which one rounding makes larger decides nothing. Relative errors, so a fraction of |b|^2.
RISE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class ScaleSolution:
    """``scales``: [n_kept] float64 (all 1.0 when rejected); ``reason`` says why a solve was rejected;
    ``heldout_error_untuned`` / ``_tuned``: the relative reconstruction error ``|A^T s - b|^2 / |b|^2`` on held-out
    samples at scales of 1 and at the solved scales (None when there were no held-out samples or no valid solve)."""

    scales: torch.Tensor
    accepted: bool
    reason: str
    lsmr_istop: int
    heldout_error_untuned: float | None = None
    heldout_error_tuned: float | None = None


def normal_equations(contributions: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A A^T, A b)`` in float64 for one batch.

    ``contributions`` A: [n_kept, n_outputs], row u is kept unit u's output with scale 1, flattened over
    tokens x hidden; ``target`` b: [n_outputs], the dense layer's output minus bias and residual.
    Returns (gram [n_kept, n_kept], rhs [n_kept]).
    """
    if contributions.dim() != 2 or target.dim() != 1 or contributions.shape[1] != target.shape[0]:
        raise ValueError(
            f"expected contributions [n_kept, n_outputs] and target [n_outputs], got "
            f"{tuple(contributions.shape)} and {tuple(target.shape)}"
        )
    if contributions.shape[0] == 0:
        raise ValueError("contributions has no kept units: a layer with nothing kept has no scales to tune")
    if not torch.isfinite(contributions).all() or not torch.isfinite(target).all():
        raise ValueError("contributions or target contain NaN or inf")
    a = contributions.detach().double()
    return a @ a.t(), a @ target.detach().double()


def solve_mask_scales(
    gram: torch.Tensor,
    rhs: torch.Tensor,
    damp: float = 1.0,
    max_abs_scale: float = 10.0,
    max_iter: int = 100_000,
) -> ScaleSolution:
    """Damped least-squares scales of one layer's kept units, with the reference's safeguards.

    ``gram``: [n_kept, n_kept] and ``rhs``: [n_kept], sums of ``normal_equations`` over batches. ``damp``: LSMR
    damping (>= 0) on the change from scale 1; ``max_abs_scale``: largest accepted |scale|; ``max_iter``: LSMR
    iteration limit. scipy's default (n_kept iterations) stops short on the ill-conditioned Gram matrices of real
    layers; the reference's later versions also raise it (to 1e5-1e6), and each iteration is one small mat-vec.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or rhs.shape != gram.shape[:1] or gram.shape[0] == 0:
        raise ValueError(
            f"expected gram [n_kept, n_kept] and rhs [n_kept] with n_kept >= 1, got {tuple(gram.shape)} and "
            f"{tuple(rhs.shape)}"
        )
    if not torch.isfinite(gram).all() or not torch.isfinite(rhs).all():
        raise ValueError("gram or rhs contain NaN or inf")
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp!r}")
    if not max_abs_scale > 0:
        raise ValueError(f"max_abs_scale must be > 0, got {max_abs_scale!r}")

    g = gram.detach().double().cpu().numpy()
    shifted_rhs = rhs.detach().double().cpu().numpy() - g.sum(axis=1)  # equations for d = s - 1
    change, istop = lsmr(g, shifted_rhs, damp=damp, maxiter=max_iter)[:2]
    scales = torch.from_numpy(np.asarray(change) + 1.0)
    unchanged = torch.ones_like(scales)

    if istop not in _CONVERGED_ISTOP:
        return ScaleSolution(unchanged, False, f"LSMR did not converge (istop={istop})", istop)
    if not torch.isfinite(scales).all() or scales.abs().max() > max_abs_scale:
        return ScaleSolution(
            unchanged,
            False,
            f"scales out of range: max |scale| {float(scales.abs().max()):.3g} > {max_abs_scale}",
            istop,
        )
    return ScaleSolution(scales, True, "", istop)


def residual_sum_of_squares(gram: torch.Tensor, rhs: torch.Tensor, target_sq: float, scales: torch.Tensor) -> float:
    """``|A^T s - b|^2`` from the normal equations ``gram = A A^T`` [n_kept, n_kept], ``rhs = A b`` [n_kept] and
    ``target_sq = |b|^2``, for scales s [n_kept]."""
    s = scales.detach().double().to(gram.device)
    return float(s @ gram.double() @ s - 2 * s @ rhs.double() + target_sq)


def choose_mask_scales(
    fit: tuple[torch.Tensor, torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor, float] | None,
    damp: float = 1.0,
    max_abs_scale: float = 10.0,
    max_iter: int = 100_000,
) -> ScaleSolution:
    """``solve_mask_scales`` on the ``fit`` normal equations (gram, rhs), kept only when the scales also lower the
    reconstruction error on the ``heldout`` samples' (gram, rhs, |b|^2); else scales of 1 and the reason.
    ``heldout`` None (too few samples to hold any out): the safeguards alone decide."""
    solution = solve_mask_scales(*fit, damp=damp, max_abs_scale=max_abs_scale, max_iter=max_iter)
    if heldout is None:
        return solution
    gram, rhs, target_sq = heldout
    scale = max(target_sq, 1e-300)  # relative errors; an all-zero target has nothing to reconstruct
    untuned = residual_sum_of_squares(gram, rhs, target_sq, torch.ones_like(solution.scales)) / scale
    if not solution.accepted:
        return replace(solution, heldout_error_untuned=untuned)
    tuned = residual_sum_of_squares(gram, rhs, target_sq, solution.scales) / scale
    if tuned > untuned + RISE_TOLERANCE:
        return ScaleSolution(torch.ones_like(solution.scales), False,
                             f"held-out error would rise: {untuned:.4g} -> {tuned:.4g}", solution.lsmr_istop,
                             untuned, tuned)
    return replace(solution, heldout_error_untuned=untuned, heldout_error_tuned=tuned)
