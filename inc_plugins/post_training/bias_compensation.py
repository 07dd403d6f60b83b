"""FLAP's bias compensation (An et al. 2024) for the units Kwon et al.'s mask search removed (``bias_compensation``).

A removed head (key/value group) or FFN neuron stops feeding its channels of the output projection (attention:
o_proj / BERT ``attention.output.dense``; FFN: down_proj / BERT ``output.dense``). As FLAP does, each removed
channel is replaced by its mean over the calibration tokens, which goes into the projection's bias:
``b' = b + W[:, removed] @ mean(x[removed])`` (``algorithms.flap.bias_compensation``), so on the calibration mean
the pruned projection gives what it gave before the removal.

Which mean. FLAP prunes once, from one pass over the dense model. Here the masks come last in a pipeline whose
tuning rescales the kept units (``mask_tuning``), so the means are those of the model that will be shipped: the
model under its final masks (tuned scales included), walked block by block over the calibration samples, with
every earlier block already compensated. In each block the attention's removed channels are measured first (their
inputs before the mask hook zeroes them: ``projection_moments`` records ahead of it), their shift is put in, and
then the FFN's removed channels are measured on that block's compensated attention output. The result is the
shifts, ``[n_layers, hidden]`` for each of the two projections; the weights are untouched (``add_bias_shifts``
writes the shifts into the biases, adding a bias to Llama-like projections, which have none).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from inc_plugins.algorithms.flap import bias_compensation
from inc_plugins.execution.calibration import sequential_blocks
from inc_plugins.execution.projection_moments import layer_input_moments
from inc_plugins.models.architectures import adapter_for
from inc_plugins.models.batch_inputs import batch_inputs
from inc_plugins.models.output_bias import ensure_bias
from inc_plugins.models.structure_masks import apply_structure_masks, expand_head_mask, mask_structure

from .data import token_mask

__all__ = ["OutputBiasShifts", "add_bias_shifts", "removed_unit_bias_shifts"]


@dataclass(frozen=True)
class OutputBiasShifts:
    """What to add to each block's output projection biases: ``attention`` and ``ffn`` ``[n_layers, hidden]``
    (rows of zeros where a block removed nothing of that kind)."""

    attention: Tensor
    ffn: Tensor


def _real_tokens(batch: Any) -> Tensor:
    args, kwargs = batch_inputs(batch)
    return token_mask(kwargs) if kwargs else torch.ones(args[0].shape[:2], dtype=torch.bool)


@contextlib.contextmanager
def _added_to_outputs(module: nn.Module, shift: Tensor):
    """``module``'s output plus ``shift`` (a forward hook), while the context lasts: a bias change that leaves the
    weights alone."""
    handle = module.register_forward_hook(lambda _module, _args, output: output + shift.to(output.dtype))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def removed_unit_bias_shifts(model: nn.Module, batches: Sequence[Any], head_mask: Tensor, neuron_mask: Tensor
                             ) -> OutputBiasShifts:
    """The bias shifts of the units ``head_mask`` (``[n_layers, n_heads]`` or per key/value group) and
    ``neuron_mask`` (``[n_layers, n_neurons]``) remove (0 = removed, else the kept unit's scale), measured on
    ``batches`` (dict batches; padding left out by their ``attention_mask``) as the module docstring says.
    ``model`` is the dense model, returned unchanged."""
    structure = mask_structure(model)
    adapter = adapter_for(model)
    _, blocks = adapter.blocks(model)
    layout = adapter.layout
    removed_channels = (expand_head_mask(head_mask, structure) == 0).repeat_interleave(structure.head_dim, dim=1)
    removed_neurons = neuron_mask == 0
    masks = [_real_tokens(batch) for batch in batches]
    shifts = {name: [] for name in (layout.attention_output, layout.ffn_out)}
    with contextlib.ExitStack() as compensated, apply_structure_masks(model, head_mask, neuron_mask):
        walk = compensated.enter_context(contextlib.closing(
            sequential_blocks(model, batches, blocks, "mask_search bias compensation")))
        for index, block, inputs in walk:
            for name, removed in ((layout.attention_output, removed_channels[index]),
                                  (layout.ffn_out, removed_neurons[index])):
                projection = block.get_submodule(name)
                if removed.any():
                    (moments,) = layer_input_moments(block, [name], inputs, masks, f"block {index}")
                    shift = bias_compensation(projection.weight, moments.mean, removed)
                else:
                    shift = torch.zeros(projection.out_features, dtype=projection.weight.dtype)
                shifts[name].append(shift.cpu())
                # later measurements (this block's FFN, the blocks after it) see the compensated model
                compensated.enter_context(_added_to_outputs(projection, shift))
    return OutputBiasShifts(torch.stack(shifts[layout.attention_output]), torch.stack(shifts[layout.ffn_out]))


@torch.no_grad()
def add_bias_shifts(model: nn.Module, shifts: OutputBiasShifts) -> None:
    """Add ``shifts`` to the output projections' biases of every block (a zero bias is added first where a
    projection has none, as FLAP does: ``models.output_bias``)."""
    adapter = adapter_for(model)
    _, blocks = adapter.blocks(model)
    for block, attention, ffn in zip(blocks, shifts.attention, shifts.ffn, strict=True):
        for name, shift in ((adapter.layout.attention_output, attention), (adapter.layout.ffn_out, ffn)):
            bias = ensure_bias(block.get_submodule(name))
            bias.add_(shift.to(bias.device, bias.dtype))
