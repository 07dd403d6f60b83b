"""Kwon et al. (2022) post-training head/neuron pruning as INC pruning type "mask_search".

``inc_plugins.prepare_pruning(model, pruning_config(pruning_configs=[{"pruning_type": "mask_search",
"target_sparsity": 0.4, ...}]), dataloader=labelled_batches)`` builds ``MaskSearchPruning``, which at construction
runs ``inc_plugins.post_training.prune_post_training`` (Fisher -> FLOPs/latency search -> rearrangement -> mask
tuning, each of the last two kept only when it raises the top-1 agreement with the dense model on calibration
samples) and leaves the model pruned. Its config keys are the fields of ``MaskSearchSettings`` (``KwonSettings``).
``pattern``, ``op_names`` and ``excluded_op_names`` do not apply: the search covers every attention unit and FFN
neuron of every block, and nothing else.

Where the result lives:

* in the weights: the masks are folded in (``structure_masks.fold_structure_masks``): pruned heads' query/key/value
  rows and output-projection columns, and pruned neurons' FFN-input rows and FFN-output columns, are zero; tuned
  scales multiply the kept columns of the output projections. With ``bias_compensation`` the removed units' mean
  contribution is added to the output projections' biases (``post_training.bias_compensation``; Llama-like blocks
  get biases there that their config cannot describe, as FLAP's: slim before saving). The model is a plain model
  (no hooks).
* ``pruning.result`` (``MaskSearchResult``): the float ``head_mask`` [n_layers, n_heads] and ``neuron_mask``
  [n_layers, n_neurons] (0 = pruned, else the tuned scale, already folded into the weights), the MACs (or seconds)
  kept, the budget and the dense cost, the Fisher gradients, the tuning log and the step checks.
  ``inc_plugins.slim(model, pruning.result)`` removes the pruned heads and neurons physically.
* ``pruning.pruners``: two INC pruners whose ``.masks`` are the zeroed rows (pattern "1xchannel": query, key, value,
  FFN input layers) and columns (pattern "channelx1": attention output, FFN output) in each weight's shape, so INC's
  ``get_sparsity_ratio`` report (``pruning.report``, and ``on_train_end``) counts exactly the zeroed weights.
  Note that it reports *weight* sparsity over all Linear layers, not the FLOPs fraction ``target_sparsity`` sets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from inc_plugins.models.structure_masks import mask_structure
from inc_plugins.models.surgery_transformers import slim_model
from inc_plugins.post_training import KwonResult, KwonSettings, fold_kwon_result, prune_post_training

from .one_shot_base import OneShotPruning, PruningResult
from .structure_pruners import check_whole_model_entry, zeroed_structure_pruners

__all__ = ["MaskSearchPruning", "MaskSearchResult", "MaskSearchSettings"]

# mask_search's config keys are the settings of Kwon et al.'s pipeline
MaskSearchSettings = KwonSettings


@dataclasses.dataclass(frozen=True)
class MaskSearchResult(PruningResult, KwonResult):
    """The search's ``KwonResult`` (masks, costs, gradients, tuning) and the zeroed layers. The masks' scales are
    already folded into the weights, so slimming removes the pruned units without scaling again; compensated
    biases stay in the slimmed output projections."""

    def slimmed(self, model: nn.Module) -> nn.Module:
        """``model`` without the pruned heads and neurons (slimmed in place: ``surgery_transformers.slim_model``)."""
        return slim_model(model, (self.head_mask != 0).float(), (self.neuron_mask != 0).float())


class MaskSearchPruning(OneShotPruning):
    """One-shot "mask_search" over one config entry; prunes at construction (see the module docstring).

    ``loss_func(outputs, batch) -> scalar`` replaces ``outputs.loss`` for the Fisher gradients.
    """

    result_class = MaskSearchResult
    prunes_structures = True
    combines_across_ranks = True  # the Fisher gradients (``post_training.pipeline``)

    def inspect_model(self, model: nn.Module, infos: Sequence[Mapping[str, Any]]) -> None:
        check_whole_model_entry("mask_search", infos)
        mask_structure(model)  # UnsupportedModelError (naming the supported families) before any work

    def _generate_pruners(self) -> list:
        return []  # built from the search's result, once it exists

    def prune(self, dataloader, loss_func) -> dict[str, Any]:
        (info,), (settings,) = self.pruners_info, self.settings
        search = prune_post_training(self._model, dataloader, settings, loss_func)
        slices = fold_kwon_result(self._model, search)
        self.pruners = zeroed_structure_pruners(info, settings, slices)
        return {field.name: getattr(search, field.name) for field in dataclasses.fields(KwonResult)}
