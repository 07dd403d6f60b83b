"""Per-channel statistics (``ChannelMoments``) of what some layers of a block receive, over the real tokens of the
calibration batches a block walk recorded (``calibration.sequential_blocks``).

FLAP and Wanda-sp score the input channels of the output projections by them (``inc.structured_units``), and
mask_search's bias compensation takes the removed units' means from them (``post_training.bias_compensation``). The
recording hooks go in front of every other forward pre-hook of the layer (``prepend``), so they see the input as the
block hands it over, before a mask hook (``structure_masks.MaskHooks``) scales or zeroes channels of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from inc_plugins.algorithms.channel_moments import ChannelMoments

from .calibration import BlockInput, run_block

__all__ = ["layer_input_moments", "recording_input_moments"]


@contextlib.contextmanager
def recording_input_moments(block: nn.Module, names: Sequence[str], moments: Sequence[ChannelMoments],
                            label: str) -> Iterator[list[torch.Tensor | None]]:
    """Within the block, every call of ``block``'s layers ``names`` adds its input's real tokens to the matching
    ``moments``. The caller puts the running batch's ``[batch, seq]`` bool token mask in the yielded one-element list
    before each block call; ``label`` names the block in errors."""
    current: list[torch.Tensor | None] = [None]

    def accumulate(statistic: ChannelMoments):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["input"]
            tokens = current[0]
            if tokens is None or tuple(x.shape[:-1]) != tuple(tokens.shape):
                raise RuntimeError(f"{label}: a recorded layer's input {list(x.shape)} does not match the batch's "
                                   f"tokens {None if tokens is None else list(tokens.shape)}")
            statistic.update(x.reshape(-1, x.shape[-1])[tokens.flatten().to(x.device)])
        return hook

    handles = [block.get_submodule(name).register_forward_pre_hook(accumulate(statistic), with_kwargs=True,
                                                                   prepend=True)
               for name, statistic in zip(names, moments, strict=True)]
    try:
        yield current
    finally:
        for handle in handles:
            handle.remove()


def layer_input_moments(block: nn.Module, names: Sequence[str], inputs: Sequence[BlockInput],
                        masks: Sequence[torch.Tensor], label: str) -> tuple[ChannelMoments, ...]:
    """The input statistics of ``block``'s layers ``names`` (one ``ChannelMoments`` each) over the block's recorded
    ``inputs`` (one per calibration batch, in order) with their real-token ``masks`` (``[batch, seq]`` bool)."""
    moments = tuple(ChannelMoments() for _ in names)
    with recording_input_moments(block, names, moments, label) as current:
        for block_input, tokens in zip(inputs, masks, strict=True):
            current[0] = tokens
            run_block(block, block_input)
    return moments
