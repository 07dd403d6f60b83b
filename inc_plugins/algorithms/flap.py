"""FLAP (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language Models", AAAI):
fluctuation scores of an output projection's input channels, standardised unit scores, and bias compensation.

A channel j of an output projection W ``[out, in]`` (attention: o_proj / BERT ``attention.output.dense``, whose
channels are the heads' context features; FFN: down_proj / BERT ``output.dense``, whose channels are the neurons)
matters by how much its input *fluctuates* around its mean, weighted by the column it feeds:

    score_j = var(x_j) * sum_i W_ij^2            (the paper's WIFV metric)

A removed channel is replaced by its mean, which goes into the projection's bias, so the removal costs only the
fluctuation: ``b' = b + W[:, removed] @ mean(x[removed])`` (``bias_compensation``). On the calibration mean the
pruned layer then gives exactly the dense layer's output.

FLAP's adaptive structure (its "AL-AM": across layers and modules) compares units of different blocks and of both
sub-layers, whose raw scores live on different scales, so each module's channel scores are standardised within their
block (``standardized``: zero mean, unit sample standard deviation over the module's channels) and a head unit's score
is the mean of its channels' standardised scores (``unit_scores``), as the reference does. The reference squares the
attention channels' WIFV before standardising (``lib/prune.py``); the paper's definition, followed here, does not.
The global FLOPs-weighted ranking of those scores is ``unit_selection.global_selection``.
"""

from __future__ import annotations

import torch

__all__ = ["bias_compensation", "fluctuation_scores", "standardized", "unit_scores"]


def _check_columns(weight: torch.Tensor, per_channel: torch.Tensor, what: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [out_features, in_features], got shape {list(weight.shape)}")
    if per_channel.shape != (weight.shape[1],):
        raise ValueError(f"{what} must have shape [in_features] = [{weight.shape[1]}], got {list(per_channel.shape)}")


def fluctuation_scores(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """``[in_features]`` float64: ``variance_j * sum_i weight_ij^2`` for ``weight`` ``[out, in]`` and the input
    channels' ``variance`` ``[in]`` over the calibration tokens."""
    _check_columns(weight, variance, "variance")
    return variance.double() * weight.detach().double().square().sum(dim=0)


def standardized(scores: torch.Tensor) -> torch.Tensor:
    """``(scores - mean) / std`` along the last dimension (sample standard deviation); all-equal scores give 0."""
    centred = scores - scores.mean(dim=-1, keepdim=True)
    spread = scores.std(dim=-1, keepdim=True) if scores.shape[-1] > 1 else torch.zeros_like(centred[..., :1])
    return torch.where(spread > 0, centred / torch.where(spread > 0, spread, 1), torch.zeros_like(centred))


def unit_scores(standardized_scores: torch.Tensor, channels_per_unit: int) -> torch.Tensor:
    """``[..., channels]`` -> ``[..., units]``: the mean of each unit's consecutive channels (a neuron is a unit of
    one channel)."""
    if standardized_scores.shape[-1] % channels_per_unit:
        raise ValueError(f"{standardized_scores.shape[-1]} channels cannot be split into units of {channels_per_unit}")
    return standardized_scores.unflatten(-1, (-1, channels_per_unit)).mean(dim=-1)


# the `bias_compensation` config key, which the flap and mask_search types share (one recipe key, one description)
BIAS_COMPENSATION_KEY = ("add the removed units' mean contribution over the calibration tokens to the output "
                         "projections' biases (FLAP's compensation; a bias is added to Llama-like o_proj / down_proj, "
                         "which have none)")


def bias_compensation(weight: torch.Tensor, mean_input: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """``[out_features]``: what the ``removed`` input channels (bool ``[in]``) contribute on average,
    ``weight[:, removed] @ mean_input[removed]``, to be added to the projection's bias (in ``weight``'s dtype)."""
    _check_columns(weight, mean_input, "mean_input")
    _check_columns(weight, removed, "removed")
    columns = removed.to(weight.device).bool()
    contribution = weight.detach().double()[:, columns] @ mean_input.to(weight.device).double()[columns]
    return contribution.to(weight.dtype)
