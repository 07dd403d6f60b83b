"""Wanda-sp (An et al. 2024's structured baseline, from Sun et al. 2023's Wanda): Wanda's score summed over whole
input channels of an output projection.

For an output projection W ``[out, in]`` (o_proj / down_proj, BERT ``attention.output.dense`` / ``output.dense``)
the channel j's score is ``sum_i |W_ij| * ||X_j||_2``: every Wanda score of the column that the channel (a neuron, or
one feature of a head's context) feeds. A head unit's score is the sum over its channels (``unit_selection.unit_sums``;
the reference averages over rows, a factor every channel shares). Blocks then lose the same share of their FLOPs
(``unit_selection.uniform_selection``).
"""

from __future__ import annotations

import torch

from .wanda import wanda_scores

__all__ = ["wanda_sp_channel_scores"]


def wanda_sp_channel_scores(weight: torch.Tensor, squared_norms: torch.Tensor) -> torch.Tensor:
    """``[in_features]`` float32: ``sum_i |weight_ij| * sqrt(squared_norms_j)`` for ``weight`` ``[out, in]`` and the
    input channels' ``squared_norms`` ``||X_j||_2^2`` over the calibration tokens."""
    return wanda_scores(weight, squared_norms.float()).sum(dim=0)
