"""One-shot magnitude pruning (``pruning_type="one_shot_magnitude"``): |W| ranked within each output row, or N:M
along the inputs, optionally with OWL's outlier-weighted block sparsities.

INC's own ``magnitude`` prunes while training (``optimizer=``). This is the post-training baseline of the Wanda and
OWL papers: no calibration for uniform sparsity (``dataloader`` may be omitted; the weights alone decide), while
``layer_sparsity: owl`` runs one dense pass of Wanda's block walk for the blocks' outlier ratios, which OWL measures
on Wanda's scores |W|·‖X‖ for every pruning method, magnitude included, and then prunes each layer to its count by
magnitude.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch

from inc_plugins.algorithms.nm_mask import nm_mask
from inc_plugins.algorithms.owl import row_counts
from inc_plugins.algorithms.wanda import per_output_mask, rows_mask
from inc_plugins.models.layer_views import apply_matrix_mask, weight_matrix

from .calibrated_sparsity import CalibratedSparsitySettings
from .config_checks import PruningConfigError
from .wanda import WandaPruner, WandaPruning, matrix_to_weight_layout, nm_column_order

__all__ = ["MagnitudeSettings", "OneShotMagnitudePruner", "OneShotMagnitudePruning"]


class MagnitudeSettings(CalibratedSparsitySettings):
    """The keys of a ``pruning_type="one_shot_magnitude"`` config entry."""

    method: ClassVar[str] = "Magnitude"


class OneShotMagnitudePruner(WandaPruner):
    """INC pruner of one ``one_shot_magnitude`` config entry; Wanda's hooks only serve OWL's dense pass."""

    settings: MagnitudeSettings

    collects_moments = False  # (WandaPruner's properties, fixed here)
    collects_gram = False

    def _magnitude_keep(self, module: torch.nn.Module, scores: torch.Tensor, name: str) -> torch.Tensor:
        settings = self.settings
        if settings.nm is not None:
            order = nm_column_order(module)
            return nm_mask(scores[:, order], *settings.nm)[:, torch.argsort(order)]
        if self.pruned_counts is not None:  # OWL: each layer's count, spread over its rows
            return rows_mask(scores, row_counts(self.pruned_counts[name], *scores.shape))
        return per_output_mask(scores, settings.target_sparsity)

    def prune(self, names: Iterable[str]) -> None:
        for name in names:
            module = self.modules[name]
            keep = self._magnitude_keep(module, weight_matrix(module).detach().abs().float(), name)
            apply_matrix_mask(module, keep)
            self.masks[name] = matrix_to_weight_layout(module, keep).to(module.weight.device).contiguous()
            self.pruned_layers.add(name)
            self.feature_norms.pop(name, None)


class OneShotMagnitudePruning(WandaPruning):
    """One-shot magnitude pruning over every ``one_shot_magnitude`` config entry; prunes at construction."""

    pruner_class = OneShotMagnitudePruner

    def prune(self, dataloader, loss_func) -> None:
        owl = [p for p in self.pruners if p.settings.needs_dense_pass]
        if owl:
            if dataloader is None:
                raise PruningConfigError(
                    "layer_sparsity 'owl' sets the blocks' sparsities from their outlier Wanda scores, which need "
                    "calibration data: pass dataloader="
                )
            self._walk(dataloader, owl, prune=False)
            self._allocate_owl(owl)
        for pruner in self.pruners:
            pruner.prune(list(pruner.modules))
