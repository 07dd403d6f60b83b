"""FLAP (An et al. 2024) as the one-shot INC pruning type "flap": fluctuation scores, one FLOPs-weighted ranking of
every block's head units and neurons, bias compensation. The math is ``algorithms.flap`` and
``algorithms.unit_selection.global_selection``; what the structured types share is ``structured_units``.

As the reference, the statistics come from one pass over the *dense* model (every block's output projections' inputs:
per channel, the mean and the variance over the calibration tokens), since the ranking spans all blocks; then every
block loses its units at once. With ``bias_compensation`` each output projection's bias takes the removed channels'
mean contribution; a Llama-like block has no bias there, so a zero one is added first (``models.output_bias``), which
a slimmed model records so that ``from_pretrained`` rebuilds it. A masked (not slimmed) Llama-like model therefore
has two biases per block that its config cannot describe: slim it before saving (``inc_plugins.slim``).
"""

from __future__ import annotations

import contextlib

import torch
from pydantic import Field

from inc_plugins.algorithms.flap import (BIAS_COMPENSATION_KEY, bias_compensation, fluctuation_scores, standardized,
                                         unit_scores)
from inc_plugins.algorithms.unit_selection import UnitSelection, global_selection
from inc_plugins.execution.calibration import sequential_blocks
from inc_plugins.models.output_bias import ensure_bias
from inc_plugins.post_training.flops_budget import UnitCosts

from .structured_units import StructuredUnitPruning, StructuredUnitSettings

__all__ = ["FlapPruning", "FlapSettings"]


class FlapSettings(StructuredUnitSettings):
    """The keys of a ``pruning_type="flap"`` config entry."""

    bias_compensation: bool = Field(True, description=BIAS_COMPENSATION_KEY)


class FlapPruning(StructuredUnitPruning):
    """One-shot FLAP over the one ``pruning_type="flap"`` config entry; prunes at construction."""

    def remove_units(self, batches, masks, costs: UnitCosts, settings: FlapSettings
                     ) -> tuple[UnitSelection, torch.Tensor, torch.Tensor, bool]:
        layout, structure = self.adapter.layout, self.structure
        channels_per_unit = structure.heads_per_unit * structure.head_dim
        head_scores, neuron_scores, means = [], [], []
        walk = sequential_blocks(self._model, batches, self.blocks, "FLAP calibration")
        with contextlib.closing(walk):
            for index, block, inputs in walk:
                attention, ffn = self.block_moments(index, inputs, masks)
                attention_out = block.get_submodule(layout.attention_output).weight
                ffn_out = block.get_submodule(layout.ffn_out).weight
                head_scores.append(unit_scores(standardized(fluctuation_scores(attention_out, attention.variance)),
                                               channels_per_unit))
                neuron_scores.append(standardized(fluctuation_scores(ffn_out, ffn.variance)))
                means.append((attention.mean, ffn.mean))
        head_scores, neuron_scores = torch.stack(head_scores), torch.stack(neuron_scores)
        selection = global_selection(head_scores, neuron_scores, costs.per_head_unit, costs.per_neuron,
                                     settings.target_sparsity * costs.dense)
        if settings.bias_compensation:
            self._compensate(selection, means)
        self.fold_units(selection.head_keep, selection.neuron_keep)
        return selection, head_scores, neuron_scores, settings.bias_compensation

    @torch.no_grad()
    def _compensate(self, selection: UnitSelection, means) -> None:
        """Each output projection's bias += its removed columns' weights times their inputs' calibration means (the
        weights before they are zeroed)."""
        layout, dh = self.adapter.layout, self.structure.head_dim
        for block, head_keep, neuron_keep, (attention_mean, ffn_mean) in zip(
                self.blocks, self.per_query_head(selection.head_keep), selection.neuron_keep, means):
            for name, removed, mean in ((layout.attention_output, head_keep.repeat_interleave(dh) == 0, attention_mean),
                                        (layout.ffn_out, ~neuron_keep, ffn_mean)):
                # every block gets the bias, also where nothing was removed: the slimmed model's record names the
                # layers per model, not per block
                projection = block.get_submodule(name)
                ensure_bias(projection).add_(bias_compensation(projection.weight, mean, removed))
