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

from inc_plugins.models.layer_views import apply_matrix_mask, weight_matrix

from .calibrated_sparsity import CalibratedSparsitySettings
from .config_checks import PruningConfigError
from .wanda import WandaPruner, WandaPruning

__all__ = ["MagnitudeSettings", "OneShotMagnitudePruner", "OneShotMagnitudePruning"]


class MagnitudeSettings(CalibratedSparsitySettings):
    """The keys of a ``pruning_type="one_shot_magnitude"`` config entry."""

    method: ClassVar[str] = "Magnitude"


class OneShotMagnitudePruner(WandaPruner):
    """INC pruner of one ``one_shot_magnitude`` config entry; Wanda's hooks only serve OWL's dense pass."""

    settings: MagnitudeSettings

    collects_moments = False  # (WandaPruner's properties, fixed here)
    collects_gram = False

    def prune(self, names: Iterable[str]) -> None:
        for name in names:
            module = self.modules[name]
            keep = self._per_output_keep(name, weight_matrix(module).detach().abs().float())  # |W| as the scores
            apply_matrix_mask(module, keep)
            self._record_mask(name, keep)
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
