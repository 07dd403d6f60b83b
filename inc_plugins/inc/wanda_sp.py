"""Wanda-sp (FLAP's structured Wanda baseline) as the one-shot INC pruning type "wanda_sp". The math is
``algorithms.wanda_sp`` and ``algorithms.unit_selection.uniform_selection``; what the structured types share is
``structured_units``.

As the reference (``prune_wanda_sp``), blocks are pruned in order: a block's output projections' input norms are
collected on the outputs of the blocks already pruned, the block loses the same share of its FLOPs as every other
(the same numbers of head units and neurons, its lowest-scored ones), and its pruned outputs feed the next block.
No bias compensation.
"""

from __future__ import annotations

import contextlib

import torch

from inc_plugins.algorithms.unit_selection import UnitSelection, unit_sums, uniform_selection
from inc_plugins.algorithms.wanda_sp import wanda_sp_channel_scores
from inc_plugins.execution.calibration import sequential_blocks
from inc_plugins.post_training.flops_budget import UnitCosts

from .structured_units import StructuredUnitPruning, StructuredUnitSettings

__all__ = ["WandaSpPruning", "WandaSpSettings"]


class WandaSpSettings(StructuredUnitSettings):
    """The keys of a ``pruning_type="wanda_sp"`` config entry."""


class WandaSpPruning(StructuredUnitPruning):
    """One-shot Wanda-sp over the one ``pruning_type="wanda_sp"`` config entry; prunes at construction."""

    def remove_units(self, batches, masks, costs: UnitCosts, settings: WandaSpSettings
                     ) -> tuple[UnitSelection, torch.Tensor, torch.Tensor, bool]:
        layout, structure = self.adapter.layout, self.structure
        channels_per_unit = structure.heads_per_unit * structure.head_dim
        head_keep = torch.ones(structure.n_layers, structure.n_head_units, dtype=torch.bool)
        neuron_keep = torch.ones(structure.n_layers, structure.n_neurons, dtype=torch.bool)
        head_scores, neuron_scores, removed = [], [], 0
        walk = sequential_blocks(self._model, batches, self.blocks, "Wanda-sp calibration")
        with contextlib.closing(walk):
            for index, block, inputs in walk:
                attention, ffn = self.block_moments(index, inputs, masks)
                head_scores.append(unit_sums(wanda_sp_channel_scores(
                    block.get_submodule(layout.attention_output).weight, attention.squared_norms), channels_per_unit))
                neuron_scores.append(wanda_sp_channel_scores(block.get_submodule(layout.ffn_out).weight,
                                                             ffn.squared_norms))
                chosen = uniform_selection(head_scores[-1][None], neuron_scores[-1][None], costs.per_head_unit,
                                           costs.per_neuron, settings.target_sparsity)
                head_keep[index], neuron_keep[index] = chosen.head_keep[0], chosen.neuron_keep[0]
                removed += chosen.removed_cost
                self.fold_units(head_keep, neuron_keep, [index])  # before the walk computes the next block's inputs
        return UnitSelection(head_keep, neuron_keep, removed), torch.stack(head_scores), torch.stack(neuron_scores), False
