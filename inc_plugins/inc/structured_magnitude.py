"""Structured magnitude as the one-shot INC pruning type "structured_magnitude": head units and neurons scored by the
L2 norms of the output-projection columns they feed (``algorithms.structured_magnitude``), the same share of every
block's FLOPs removed (``algorithms.unit_selection.uniform_selection``). Data-free: ``dataloader`` may be omitted when
``seq_len`` (the sequence length the FLOPs are counted at) is set; given, it only supplies that length."""

from __future__ import annotations

import torch

from inc_plugins.algorithms.structured_magnitude import column_norms
from inc_plugins.algorithms.unit_selection import UnitSelection, unit_sums, uniform_selection
from inc_plugins.post_training.flops_budget import UnitCosts

from .structured_units import StructuredUnitPruning, StructuredUnitSettings

__all__ = ["StructuredMagnitudePruning", "StructuredMagnitudeSettings"]


class StructuredMagnitudeSettings(StructuredUnitSettings):
    """The keys of a ``pruning_type="structured_magnitude"`` config entry."""


class StructuredMagnitudePruning(StructuredUnitPruning):
    """Structured magnitude over the one ``pruning_type="structured_magnitude"`` config entry; prunes at
    construction. Nothing to combine across ranks: the weights alone decide."""

    def remove_units(self, batches, masks, costs: UnitCosts, settings: StructuredMagnitudeSettings
                     ) -> tuple[UnitSelection, torch.Tensor, torch.Tensor, bool]:
        layout, structure = self.adapter.layout, self.structure
        channels_per_unit = structure.heads_per_unit * structure.head_dim
        head_scores = torch.stack([unit_sums(column_norms(block.get_submodule(layout.attention_output).weight),
                                             channels_per_unit) for block in self.blocks])
        neuron_scores = torch.stack([column_norms(block.get_submodule(layout.ffn_out).weight) for block in self.blocks])
        selection = uniform_selection(head_scores, neuron_scores, costs.per_head_unit, costs.per_neuron,
                                      settings.target_sparsity)
        self.fold_units(selection.head_keep, selection.neuron_keep)
        return selection, head_scores, neuron_scores, False
