"""One-shot magnitude pruning (``pruning_type="one_shot_magnitude"``): |W| ranked within each output row, or N:M
along the inputs, optionally with OWL's outlier-weighted block sparsities or DSnoT's swaps.

INC's own ``magnitude`` prunes while training (``optimizer=``). This is the post-training baseline of the Wanda and
OWL papers: no calibration for uniform sparsity (``dataloader`` may be omitted; the weights alone decide), while
``layer_sparsity: owl`` runs one dense pass of Wanda's block walk for the blocks' outlier ratios, which OWL measures
on Wanda's scores |W|·‖X‖ for every pruning method, magnitude included, and then prunes each layer to its count by
magnitude. ``dsnot: true`` starts DSnoT from the magnitude mask, as the DSnoT paper does (its ``--initial_method
magnitude``): Wanda's sequential block walk collects the input statistics, and each block is pruned before the next
one's inputs are computed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch

from inc_plugins.execution.streamed_model import block_stream, resident_block
from inc_plugins.models.layer_views import apply_matrix_mask, weight_matrix

from .calibrated_sparsity import ScoredMaskSettings
from .config_checks import PruningConfigError
from .wanda import WandaPruner, WandaPruning

__all__ = ["MagnitudeSettings", "OneShotMagnitudePruner", "OneShotMagnitudePruning"]


class MagnitudeSettings(ScoredMaskSettings):
    """The keys of a ``pruning_type="one_shot_magnitude"`` config entry."""

    method: ClassVar[str] = "Magnitude"


class OneShotMagnitudePruner(WandaPruner):
    """INC pruner of one ``one_shot_magnitude`` config entry; Wanda's hooks serve OWL's dense pass and DSnoT."""

    settings: MagnitudeSettings

    collects_gram = False  # (WandaPruner's property, fixed here)

    def _keep(self, name: str) -> torch.Tensor:
        magnitude = weight_matrix(self.modules[name]).detach().abs().float()
        return (self._dsnot_keep(name, magnitude, self.scores(name)) if self.settings.dsnot
                else self._per_output_keep(name, magnitude))

    def prune(self, names: Iterable[str]) -> None:
        for name in names:
            module = self.modules[name]
            keep = self._keep_for_pruning(name)
            apply_matrix_mask(module, keep)
            self._record_mask(name, keep)
            self.feature_norms.pop(name, None)
            self.feature_moments.pop(name, None)


class OneShotMagnitudePruning(WandaPruning):
    """One-shot magnitude pruning over every ``one_shot_magnitude`` config entry; prunes at construction."""

    pruner_class = OneShotMagnitudePruner

    def prune(self, dataloader, loss_func) -> None:
        calibrated = [p for p in self.pruners if p.settings.needs_calibration]
        if calibrated and dataloader is None:
            raise PruningConfigError(
                "layer_sparsity 'owl' (the blocks' sparsities from their outlier Wanda scores) and dsnot (swaps from "
                "the layers' input statistics) need calibration data: pass dataloader="
            )
        owl = [p for p in calibrated if p.settings.needs_dense_pass]
        dsnot = [p for p in calibrated if p.settings.dsnot]  # (the settings refuse dsnot with owl)
        batches = list(dataloader) if owl and dsnot else dataloader  # two walks read the data twice
        if owl:
            self._walk(batches, owl, prune=False)
            self._allocate_owl(owl)
        if dsnot:
            self._walk(batches, dsnot, prune=True)
        plain = [p for p in self.pruners if p not in dsnot]
        if dsnot and plain and block_stream(self._model) is not None:
            raise PruningConfigError("a streamed model is pruned in one pass per block: config entries with and "
                                     "without dsnot cannot be mixed; run them one after the other")
        for index, layers in sorted(self._layers_by_block(plain).items()):
            if self._resumed(index, layers):
                continue
            with resident_block(self._model, index):  # (nothing to load for a model in memory)
                for pruner, names in layers:
                    pruner.prune(names)
                self._block_pruned(index, layers)
