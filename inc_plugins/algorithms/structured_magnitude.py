"""Structured magnitude, the data-free baseline of structured pruning: an output projection's input channel scores
by the L2 norm of the weight column it feeds, ``||W[:, j]||_2`` (as FLAP's reference ``prune_magnitude_sp``), and a
head unit by the sum over its channels (``unit_selection.unit_sums``)."""

from __future__ import annotations

import torch

__all__ = ["column_norms"]


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """``[in_features]`` float32: the L2 norm of each column of ``weight`` ``[out, in]``."""
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [out_features, in_features], got shape {list(weight.shape)}")
    return torch.linalg.vector_norm(weight.detach().float(), dim=0)
