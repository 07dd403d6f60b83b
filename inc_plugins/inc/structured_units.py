"""What the one-shot structured pruning types share: whole attention units and FFN neurons removed to a FLOPs target.

``flap``, ``wanda_sp`` and ``structured_magnitude`` score the input channels of each block's two output projections
(attention: o_proj / BERT ``attention.output.dense``; FFN: down_proj / BERT ``output.dense``), turn them into scores of
head units (a head, or a key/value group under grouped-query attention) and neurons, and remove the lowest ones until
``target_sparsity`` of the head+FFN FLOPs is gone: the constraint mask_search's budget sets (``unit_costs``, MACs per
sequence of ``seq_len`` tokens), so the four types compare at equal block FLOPs removed. What each type adds is its
scores, how it spreads the removal (``algorithms.unit_selection``) and, for FLAP, bias compensation.

The model is left masked as mask_search leaves it (``structure_masks.fold_structure_masks``: pruned rows and columns
are zero), ``pruning.result`` is a ``StructuredPruningResult`` (``inc_plugins.slim(model, result)`` removes the units),
and ``pruning.pruners`` are the zeroed rows and columns (``structure_pruners``). One config entry per model; ``op_names``
and ``excluded_op_names`` do not apply (every block's units are candidates). Input statistics are taken over the
calibration batches' real tokens (``attention_mask``; padding is left out). Under torch.distributed every rank's
statistics and token counts are combined (``execution.distributed``), so every rank removes the same units.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from inc_plugins.algorithms.channel_moments import ChannelMoments
from inc_plugins.algorithms.unit_selection import UnitSelection
from inc_plugins.execution.calibration import BlockInput
from inc_plugins.execution.distributed import combined_across_ranks, gathered_in_rank_order
from inc_plugins.execution.projection_moments import layer_input_moments
from inc_plugins.models.architectures import adapter_for
from inc_plugins.models.batch_inputs import batch_inputs
from inc_plugins.models.structure_masks import MaskStructure, fold_structure_masks, mask_structure, unit_slices
from inc_plugins.models.surgery_transformers import slim_model
from inc_plugins.plugin_settings import PluginSettings
from inc_plugins.post_training.data import token_mask
from inc_plugins.post_training.flops_budget import SEQ_LEN_DESCRIPTION, SeqLenSetting, UnitCosts, unit_costs

from .config_checks import PruningConfigError
from .one_shot_base import OneShotPruning, PruningResult
from .structure_pruners import check_whole_model_entry, zeroed_structure_pruners

__all__ = ["StructuredPruningResult", "StructuredUnitPruning", "StructuredUnitSettings", "real_token_masks"]

logger = logging.getLogger(__name__)


class StructuredUnitSettings(PluginSettings):
    """The keys every structured type reads."""

    target_sparsity: float = Field(ge=0, lt=1, description=(
        "fraction of the attention-unit and FFN-neuron FLOPs to REMOVE, in [0, 1) (MACs per sequence of seq_len "
        "tokens, as mask_search counts them)"))
    seq_len: SeqLenSetting = Field(None, description=SEQ_LEN_DESCRIPTION)


@dataclasses.dataclass(frozen=True)
class StructuredPruningResult(PruningResult):
    """The units removed and what they cost.

    ``head_mask`` ``[n_layers, n_heads]`` and ``neuron_mask`` ``[n_layers, n_neurons]``: float, 1 = kept, 0 = removed
    (per query head: under grouped-query attention a group's heads share one value). ``head_scores``
    ``[n_layers, n_head_units]`` and ``neuron_scores`` ``[n_layers, n_neurons]``: the scores the removal ranked.
    ``dense_cost``, ``removed_cost`` and ``target_cost``: MACs per sequence of ``seq_len`` tokens of the dense head
    units and neurons, of those removed, and ``target_sparsity * dense_cost`` (``removed_cost >= target_cost``).
    ``bias_compensated``: whether the removed channels' mean contribution went into the output projections' biases.
    """

    head_mask: torch.Tensor
    neuron_mask: torch.Tensor
    head_scores: torch.Tensor
    neuron_scores: torch.Tensor
    seq_len: int
    dense_cost: int
    removed_cost: int
    target_cost: float
    bias_compensated: bool

    @property
    def removed_fraction(self) -> float:
        return self.removed_cost / self.dense_cost

    def slimmed(self, model: nn.Module) -> nn.Module:
        """``model`` without the removed heads and neurons (slimmed in place: ``surgery_transformers.slim_model``);
        the output projections keep their biases, compensation included."""
        return slim_model(model, self.head_mask, self.neuron_mask)


def real_token_masks(batches: Sequence[Any]) -> list[torch.Tensor]:
    """Per batch, ``[batch, seq]`` bool: True at real tokens (``attention_mask`` of a dict batch; every token of a
    tensor or tuple batch)."""
    masks = []
    for batch in batches:
        args, kwargs = batch_inputs(batch)
        masks.append(token_mask(kwargs) if kwargs else torch.ones(args[0].shape[:2], dtype=torch.bool))
    return masks


def calibration_seq_len(masks: Sequence[torch.Tensor]) -> int:
    """The average number of real tokens per sequence over every rank's calibration batches, rounded (at least 1)."""
    counts = gathered_in_rank_order((sum(int(m.sum()) for m in masks), sum(m.shape[0] for m in masks)))
    tokens, sequences = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if sequences == 0:
        raise ValueError("the calibration dataloader yielded no sequences")
    return max(1, round(tokens / sequences))


class StructuredUnitPruning(OneShotPruning):
    """Base of the structured types: ``prune`` finds the costs, asks ``remove_units`` to choose and zero the units,
    then builds the pruners and the result. Subclasses write ``remove_units``."""

    result_class = StructuredPruningResult
    prunes_structures = True
    combines_across_ranks = True

    def inspect_model(self, model: nn.Module, infos: Sequence[Mapping[str, Any]]) -> None:
        check_whole_model_entry(self.pruning_type, infos)
        self.structure: MaskStructure = mask_structure(model)  # UnsupportedModelError naming the supported families
        self.adapter = adapter_for(model)
        _, self.blocks = self.adapter.blocks(model)

    def _generate_pruners(self) -> list:
        return []  # built from the zeroed units, once they are chosen

    # --- what a structured type writes ------------------------------------------------------------------------

    def remove_units(self, batches: list | None, masks: list[torch.Tensor] | None, costs: UnitCosts,
                     settings: StructuredUnitSettings) -> tuple[UnitSelection, torch.Tensor, torch.Tensor, bool]:
        """Choose the units to remove from ``self._model`` (``batches`` with their real-token ``masks``; None for a
        data-free type called without data), zero them (``fold_units``) and return (the selection, head-unit scores
        ``[n_layers, n_head_units]``, neuron scores ``[n_layers, n_neurons]``, whether biases were compensated)."""
        raise NotImplementedError

    # --- shared steps -----------------------------------------------------------------------------------------

    def per_query_head(self, head_keep: torch.Tensor) -> torch.Tensor:
        """A ``[n_layers, n_head_units]`` keep mask as the float ``[n_layers, n_heads]`` mask of the shared convention."""
        return head_keep.float().repeat_interleave(self.structure.heads_per_unit, dim=1)

    def fold_units(self, head_keep: torch.Tensor, neuron_keep: torch.Tensor, layers: list[int] | None = None) -> None:
        """Zero the units that ``head_keep`` ``[n_layers, n_head_units]`` and ``neuron_keep`` ``[n_layers, n_neurons]``
        (bool) remove, in the blocks ``layers`` (default: all)."""
        fold_structure_masks(self._model, self.per_query_head(head_keep), neuron_keep.float(), layers)

    def block_moments(self, index: int, inputs: Sequence[BlockInput], masks: Sequence[torch.Tensor],
                      ) -> tuple[ChannelMoments, ChannelMoments]:
        """The (attention, FFN) output projections' input statistics of block ``index`` over its recorded ``inputs``
        (one per calibration batch, in order, with its real-token ``masks``), combined across ranks."""
        layout = self.adapter.layout
        moments = layer_input_moments(self.blocks[index], (layout.attention_output, layout.ffn_out), inputs, masks,
                                      f"block {index}")
        return tuple(combined_across_ranks(statistic) for statistic in moments)

    def prune(self, dataloader, loss_func) -> dict[str, Any]:
        (info,), (settings,) = self.pruners_info, self.settings
        batches = list(dataloader) if dataloader is not None else None
        masks = real_token_masks(batches) if batches is not None else None
        if settings.seq_len is None and masks is None:
            raise PruningConfigError(f"{self.pruning_type} counts FLOPs at seq_len tokens per sequence: set seq_len or "
                                     f"pass dataloader= (its average length is used)")
        seq_len = settings.seq_len or calibration_seq_len(masks)
        costs = unit_costs(self.structure, seq_len)
        selection, head_scores, neuron_scores, compensated = self.remove_units(batches, masks, costs, settings)
        head_mask = self.per_query_head(selection.head_keep)
        neuron_mask = selection.neuron_keep.float()
        self.pruners = zeroed_structure_pruners(info, settings, unit_slices(self._model, head_mask, neuron_mask))
        logger.info("%s removed %.2f%% of the head+FFN MACs (target %.2f%%) at seq_len %d", self.pruning_type,
                    100 * selection.removed_cost / costs.dense, 100 * settings.target_sparsity, seq_len)
        return {"head_mask": head_mask, "neuron_mask": neuron_mask, "head_scores": head_scores,
                "neuron_scores": neuron_scores, "seq_len": seq_len, "dense_cost": costs.dense,
                "removed_cost": selection.removed_cost, "target_cost": settings.target_sparsity * costs.dense,
                "bias_compensated": compensated}
