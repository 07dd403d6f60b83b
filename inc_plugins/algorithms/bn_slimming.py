"""Network slimming (Liu, Li, Shen, Huang, Yan and Zhang 2017, arXiv:1708.06519): BatchNorm scales as channel gates.

The paper trains with an L1 penalty on the BatchNorm scaling factors ``gamma`` (sparsity training), ranks the
channels of *all* BN layers together by ``|gamma|``, prunes the smallest ones to a global percentile, removes
them physically and fine-tunes. The math here works on BatchNorm layers (``{name: layer}`` or an iterable of
layers; ``inc_plugins.models.cnn_structure.batchnorm_layers(model)`` finds a model's):

(a) ``bn_l1_penalty(layers, lam) = lam * sum over BN layers of sum |gamma|``, to add to the training loss. Its
    (sub)gradient with respect to ``gamma`` is ``lam * sign(gamma)``, with ``sign(0) = 0`` (the subgradient that
    autograd and the paper's reference code use). ``add_bn_l1_subgradient_(layers, lam)`` adds that term to the
    ``.grad`` of every ``gamma`` in place, between ``loss.backward()`` and ``optimizer.step()``, as the paper's
    reference code does; the two are interchangeable (the INC adapter uses the second from INC's
    ``on_before_optimizer_step`` hook).
(b) ``select_bn_channels(layers, fraction)``: global selection of the ``int(fraction * total)`` channels with the
    smallest ``|gamma|`` across the BN layers, keeping at least one channel in every layer (the paper relies on a
    percentile and notes that a layer must not be emptied; here it is a hard constraint, and a fraction that
    cannot be met without emptying a layer is an error).

Masking the selected channels (``mask_bn_channels``) and removing them physically (``slim_cnn_channels``) are
model surgery: ``inc_plugins.models.surgery_cnn``.

Departures from the paper: the selection is one-shot to a fraction of channels (the paper's iterative
multi-pass scheme is the recipe's job); channels are removed even where the BN's ``beta`` is non-zero (as in
the paper: the pruned channel's constant contribution is lost and fine-tuning recovers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from .channel_selection import prune_lowest_channels

_BatchNorm = nn.modules.batchnorm._BatchNorm

_NO_BATCHNORM = "no BatchNorm layer with a learnable scale: network slimming needs BatchNorm after each conv"


def _named_batchnorms(layers: Mapping[str, _BatchNorm] | Iterable[_BatchNorm]) -> dict[str, _BatchNorm]:
    """{name: BN layer} of the given layers (an iterable gets its positions as names)."""
    if isinstance(layers, nn.Module):  # an nn.Sequential model is iterable: its convolutions would be penalised
        raise TypeError(
            f"give BatchNorm layers ({{name: layer}} or an iterable), not a {type(layers).__name__} module: "
            f"inc_plugins.models.cnn_structure.batchnorm_layers(model) finds a model's"
        )
    return dict(layers) if isinstance(layers, Mapping) else {str(i): layer for i, layer in enumerate(layers)}


# --- (a) the sparsity penalty ------------------------------------------------------------------------------


def bn_l1_penalty(layers: Mapping[str, _BatchNorm] | Iterable[_BatchNorm], lam: float) -> Tensor:
    """``lam * sum |gamma|`` over the BN layers: a scalar to add to the loss.

    Its gradient with respect to each ``gamma`` is ``lam * sign(gamma)`` (0 where gamma is exactly 0).
    """
    batchnorms = list(_named_batchnorms(layers).values())
    if not batchnorms:
        raise ValueError(_NO_BATCHNORM)
    return lam * sum(layer.weight.abs().sum() for layer in batchnorms)


@torch.no_grad()
def add_bn_l1_subgradient_(layers: Mapping[str, _BatchNorm] | Iterable[_BatchNorm], lam: float) -> None:
    """Add ``lam * sign(gamma)`` to every BN scale's ``.grad`` (creating it if absent), in place.

    Call between ``loss.backward()`` and ``optimizer.step()``; equivalent to adding ``bn_l1_penalty`` to the loss.
    """
    batchnorms = list(_named_batchnorms(layers).values())
    if not batchnorms:
        raise ValueError(_NO_BATCHNORM)
    for layer in batchnorms:
        term = lam * torch.sign(layer.weight)
        if layer.weight.grad is None:
            layer.weight.grad = term.clone()
        else:
            layer.weight.grad.add_(term)


def batchnorm_scales(layers: Mapping[str, _BatchNorm]) -> dict[str, Tensor]:
    """{name: |gamma| [C]} (detached copies)."""
    return {name: layer.weight.detach().abs().clone() for name, layer in _named_batchnorms(layers).items()}


# --- (b) global channel selection --------------------------------------------------------------------------


def select_bn_channels(layers: Mapping[str, _BatchNorm], fraction: float, scope: str = "global") -> dict[str, Tensor]:
    """{BN name: keep mask [C] bool}: prune the channels with the smallest ``|gamma|``, across all given BN
    layers (``scope="global"``, the paper's choice; at least one channel kept per layer) or per layer."""
    scales = batchnorm_scales(layers)
    if not scales:
        raise ValueError(_NO_BATCHNORM)
    return prune_lowest_channels(scales, fraction, scope)
