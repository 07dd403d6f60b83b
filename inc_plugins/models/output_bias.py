"""Biases on the output projections of blocks whose family has none (Llama's o_proj and down_proj).

FLAP's bias compensation (``algorithms.flap``) moves the mean contribution of removed channels into the output
projection's bias; a Llama-like block has no bias there, so one is added (zeros, then the compensation). The config of
a Llama-like model cannot say that these two layers have a bias while the query, key, value, gate and up projections
have none (``attention_bias`` / ``mlp_bias`` switch whole sub-layers), so a slimmed model records the names in
``config.inc_slimmed["output_biases"]`` and the loader adds them back before the weights are read (``slimmed_auto``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .architectures import ArchitectureAdapter

__all__ = ["OUTPUT_BIASES_KEY", "add_output_biases", "ensure_bias", "output_projections_with_bias"]

OUTPUT_BIASES_KEY = "output_biases"
"""Key of ``config.inc_slimmed``: block-relative names of the output projections that carry a bias."""


def ensure_bias(linear: nn.Linear) -> nn.Parameter:
    """``linear``'s bias, a new zero one (its weight's dtype and device) when it has none."""
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device), requires_grad=linear.weight.requires_grad)
    return linear.bias


def output_projections_with_bias(blocks: Sequence[nn.Module], adapter: ArchitectureAdapter) -> list[str]:
    """Block-relative names of the attention and FFN output projections that have a bias in some block."""
    names = (adapter.layout.attention_output, adapter.layout.ffn_out)
    return [name for name in names if any(block.get_submodule(name).bias is not None for block in blocks)]


def add_output_biases(blocks: Sequence[nn.Module], names: Sequence[str]) -> None:
    """Give the layers ``names`` of every block a bias (zeros where they have none), for the weights to load into."""
    for block in blocks:
        for name in names:
            ensure_bias(block.get_submodule(name))
