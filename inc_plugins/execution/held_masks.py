"""Hold pruning masks while a model trains: every forward pass of a masked layer first zeroes its pruned weights,
so whatever the optimizer does to pruned entries (momentum, weight decay) never reaches a forward pass."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from inc_plugins.algorithms.lottery_ticket import apply_masks


@contextmanager
def enforce_masks(layers: Mapping[str, nn.Module], masks: Mapping[str, Tensor]) -> Iterator[None]:
    """Within the block, every forward pass of a masked layer first zeroes its pruned weights."""

    def hook_for(name: str):
        def hook(module: nn.Module, args) -> None:
            with torch.no_grad():
                module.weight.mul_(masks[name].to(module.weight.device, module.weight.dtype))

        return hook

    apply_masks(layers, masks)
    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        apply_masks(layers, masks)
