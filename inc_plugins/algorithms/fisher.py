"""Diagonal Fisher importance of mask variables (Kwon et al. 2022, section 4.1).

Mask variables m (one per attention head, one per FFN neuron) sit at m = 1 in the dense model. The loss increase
of zeroing a set of them is approximated with the empirical Fisher information
``I = sum_s g_s g_s^T``, where ``g_s`` is the gradient of the loss w.r.t. the masks on sample s. Its diagonal,
``sum_s g_s^2``, is the importance used by the mask search; the vectors ``g_s`` themselves are kept because the
mask rearrangement needs the off-diagonal (within-layer) part of ``I``.

Per-sample versus per-batch: the paper defines ``g_s`` per sample. The reference implementation uses one gradient
per mini-batch (the gradient of the batch's mean loss), which is cheaper and what most callers will have.
This module does not care: every gradient vector handed to ``add`` counts as one ``g_s``. Pass per-sample
gradients (a leading sample dimension) for the paper's definition, or one gradient per batch for the reference's.
The two differ by more than a constant: per-batch gradients average samples before squaring.
"""

import torch

__all__ = ["diagonal_fisher", "FisherAccumulator"]


def diagonal_fisher(grads: torch.Tensor) -> torch.Tensor:
    """Sum of squared gradients over the leading dimension.

    ``grads``: [n_vectors, *mask_shape], e.g. [n_batches, n_layers, n_heads]. Returns [*mask_shape] in float64
    (units: loss^2 per mask unit, summed, not averaged, over vectors as in the paper).
    """
    if grads.dim() < 2 or grads.shape[0] == 0:
        raise ValueError(f"grads must be [n_vectors >= 1, *mask_shape], got shape {tuple(grads.shape)}")
    if not torch.isfinite(grads).all():
        raise ValueError("grads contain NaN or inf; check the loss for overflow before computing importance")
    return grads.detach().to(torch.float64).pow(2).sum(dim=0)


class FisherAccumulator:
    """Collects mask-gradient vectors for one mask variable (heads or neurons) over a calibration set.

    Memory: all vectors are kept, on CPU in float32 (n_vectors x mask numel), because rearrangement needs them.
    """

    def __init__(self) -> None:
        self._grads: list[torch.Tensor] = []
        self._mask_shape: torch.Size | None = None

    def add(self, grad: torch.Tensor, per_sample: bool = False) -> None:
        """Record one gradient vector [*mask_shape], or [n_samples, *mask_shape] when ``per_sample``."""
        grad = grad.detach().to("cpu", torch.float32)
        batch = grad if per_sample else grad.unsqueeze(0)
        if batch.dim() < 2 or batch.shape[0] == 0:
            raise ValueError(
                f"per_sample=True needs [n_samples >= 1, *mask_shape], got shape {tuple(grad.shape)}"
                if per_sample
                else f"grad must have at least one dimension, got shape {tuple(grad.shape)}"
            )
        if self._mask_shape is None:
            self._mask_shape = batch.shape[1:]
        elif batch.shape[1:] != self._mask_shape:
            raise ValueError(
                f"gradient of shape {tuple(batch.shape[1:])} does not match the mask shape "
                f"{tuple(self._mask_shape)} of earlier gradients"
            )
        if not torch.isfinite(batch).all():
            raise ValueError("gradient contains NaN or inf; check the loss for overflow")
        self._grads.append(batch.clone())

    def __len__(self) -> int:
        """Number of gradient vectors recorded so far."""
        return sum(g.shape[0] for g in self._grads)

    def grads(self) -> torch.Tensor:
        """All recorded vectors, [n_vectors, *mask_shape] float32, in the order they were added."""
        if not self._grads:
            raise ValueError("no gradients recorded yet: call add() on at least one batch first")
        return torch.cat(self._grads, dim=0)

    def importance(self) -> torch.Tensor:
        """Diagonal Fisher importance, [*mask_shape] float64: sum of squared gradients."""
        return diagonal_fisher(self.grads())
