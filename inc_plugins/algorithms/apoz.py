"""Network trimming (Hu, Peng, Tai and Tang 2016, arXiv:1607.03250): Average Percentage of Zeros (APoZ).

The paper scores each output channel (or neuron) ``c`` of a layer by the fraction of its post-ReLU outputs that
are zero over a validation set::

    APoZ_c = sum_k sum_j [O_c,j(k) == 0] / (N * M)

with ``N`` images ``k`` and ``M`` positions ``j`` of the channel's output map (``M = 1`` for a fully connected
neuron). A channel that is almost always zero carries little information and is pruned first.

This module counts zeros in activation tensors and selects channels; what it adds or changes, and why:

- **Threshold for smooth activations (an extension, not in the paper).** GELU, SiLU, ... are never exactly zero
  for finite inputs, so an output counts as "zero" when ``|x| <= threshold``. With ``threshold=None`` the
  threshold is 0 for activations that output exact zeros (ReLU, ReLU6, Hardswish) and a smooth activation is
  an error that asks for an explicit threshold; ``threshold=0.0`` with a smooth activation is allowed (it only
  counts underflowed outputs).
- **Where the activations are read** (``inc_plugins.execution.apoz_monitor``, which feeds the counts here). For
  each layer to score (Linear or Conv1d/2d/3d), ``APoZMonitor`` watches the model's module calls and takes the
  first activation *module* that runs after the layer with only channel-wise pass-through modules in between
  (BatchNorm of the right width, Dropout, Identity, and the completion of container modules). For the CNN
  structure conv -> BatchNorm -> ReLU this is the ReLU after the BN; for a BERT FFN (``intermediate.dense`` ->
  GELU -> ``output.dense``) it is the GELU output, i.e. the input of the FFN output dense. A layer followed by
  anything else first (another weighted layer, LayerNorm, pooling, a functional ``F.relu`` that no hook can see)
  has no activation site and is reported as an error.
- **Padding tokens** can be left out: ``valid`` (``monitor.valid_positions = attention_mask``, [batch, seq]) makes
  ``[batch, seq, channels]`` activations count only positions where the mask is non-zero.
- **Selection.** The paper iterates "prune the channels with high APoZ, then fine-tune" and picks its pruned
  neurons with per-layer rules; ``channels_to_prune`` prunes a target fraction in one go, per layer or across
  layers (keeping at least one channel per layer). Iterating with fine-tuning is the caller's (recipe's) job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .channel_selection import prune_lowest_channels


def _channels_last(activations: Tensor, channel_dim: int) -> Tensor:
    return activations.movedim(channel_dim, -1)


def zero_counts(
    activations: Tensor, channel_dim: int, threshold: float = 0.0, valid: Tensor | None = None
) -> tuple[Tensor, int]:
    """(zeros per channel [C] float64, positions counted per channel) of one activation tensor.

    An output is "zero" when ``|x| <= threshold``. ``valid`` ([batch, seq], non-zero = counted) applies to
    ``[batch, seq, C]`` activations with ``channel_dim`` -1 and drops e.g. padding tokens.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    values = _channels_last(activations.detach(), channel_dim)
    channels = values.shape[-1]
    is_zero = values.abs() <= threshold
    if valid is not None:
        if is_zero.dim() != 3 or tuple(valid.shape) != tuple(is_zero.shape[:2]):
            raise ValueError(
                f"valid positions of shape {list(valid.shape)} do not match activations {list(activations.shape)}"
                f" (expected [batch, seq] for [batch, seq, channels])"
            )
        keep = valid.to(is_zero.device).bool()
        is_zero = is_zero[keep]
    rows = is_zero.reshape(-1, channels)
    return rows.sum(dim=0, dtype=torch.float64), rows.shape[0]


def apoz(activations: Tensor, channel_dim: int, threshold: float = 0.0, valid: Tensor | None = None) -> Tensor:
    """APoZ of each channel of one activation tensor: [C] float64 in [0, 1]."""
    zeros, positions = zero_counts(activations, channel_dim, threshold, valid)
    if positions == 0:
        raise ValueError("no positions to count (every position is masked out)")
    return zeros / positions


@dataclass
class APoZAccumulator:
    """Running APoZ of one layer's channels over many batches."""

    zeros: Tensor | None = None
    positions: int = 0

    def update(self, activations: Tensor, channel_dim: int, threshold: float = 0.0, valid: Tensor | None = None):
        zeros, positions = zero_counts(activations, channel_dim, threshold, valid)
        self.zeros = zeros.cpu() if self.zeros is None else self.zeros + zeros.cpu()
        self.positions += positions

    @property
    def apoz(self) -> Tensor:
        if self.zeros is None or self.positions == 0:
            raise ValueError("no activations seen yet")
        return self.zeros / self.positions


def channels_to_prune(apoz_by_layer: Mapping[str, Tensor], fraction: float, scope: str = "local") -> dict[str, Tensor]:
    """{name: keep mask [C] bool (True = kept)}: the channels with the *highest* APoZ are pruned.

    ``scope="local"``: each layer loses ``int(fraction * C)`` channels. ``scope="global"``: ``int(fraction * total)``
    channels across all layers, ranked together, at least one kept per layer. Ties: the lower index goes first.
    """
    return prune_lowest_channels({name: -values.double() for name, values in apoz_by_layer.items()}, fraction, scope)
