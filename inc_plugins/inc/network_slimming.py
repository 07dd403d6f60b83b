"""Network slimming (Liu et al. 2017): the one-shot INC pruning type "network_slimming" and the sparsity-training
regularizer "bn_l1".

``network_slimming`` (``pattern: "1xchannel"``): ranks the channels of the BatchNorm layers that directly follow
the selected convolutions by ``|gamma|`` and prunes the smallest, by masking: the conv filters (and bias) and the
BN's ``gamma`` and ``beta`` are zeroed. ``target_sparsity`` is the fraction of channels removed; ``pruning_scope``
``"global"`` (INC's default, the paper's choice) ranks them across the entry's layers, ``"local"`` per layer.
``pruning.result.keep`` is {BN name: keep mask}; ``inc_plugins.slim(model, pruning.result)`` returns the physically
smaller CNN (a copy). Selected layers without a following BN are skipped with a warning; none at all is an error.
It prunes from the weights alone: ``dataloader=`` may be omitted.

``REGS["bn_l1"]`` (``reg_type: "bn_l1"``, ``parameters: {"reg_coeff": lambda}``; INC 3.7.1 overwrites a bare
``reg_coeff`` key with the default of ``parameters``): the sparsity training. Before every optimizer step it adds
``lambda * sign(gamma)`` to the gradients of the BatchNorm layers that directly follow the entry's selected layers
(the paper's reference code does exactly this). Use it with any training-aware type, e.g. ``{"pruning_type":
"magnitude", "target_sparsity": 0.0, "pattern": "1xchannel", "pruning_op_types": ["Conv"], "reg_type": "bn_l1",
"parameters": {"reg_coeff": 1e-4}}`` for sparsity training without pruning, then ``network_slimming`` one-shot. A
training loop outside INC can instead add ``algorithms.bn_slimming.bn_l1_penalty(batchnorm_layers(model), lambda)`` (``models.cnn_structure.batchnorm_layers``) to its loss.
INC never gives a regularizer the model: it is found at the first forward pass (``find_model.ModelFinder``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from neural_compressor.compression.pruner.regs import BaseReg
from pydantic import Field, field_validator
from torch import Tensor, nn

from inc_plugins.algorithms.bn_slimming import add_bn_l1_subgradient_
from inc_plugins.algorithms.channel_selection import prune_lowest_channels
from inc_plugins.finite_checks import check_parameters, check_tensor
from inc_plugins.models.cnn_structure import conv_bn_pairs
from inc_plugins.models.surgery_cnn import mask_bn_channels, slim_cnn_channels
from inc_plugins.plugin_settings import PluginSettings

from .config_checks import PruningConfigError, require_pattern
from .find_model import ModelFinder
from .layer_selection import EXAMPLE_NAMES
from .one_shot_base import OneShotPruner, OneShotPruning, PruningResult

__all__ = ["BNL1Regularizer", "NetworkSlimmingPruner", "NetworkSlimmingPruning", "NetworkSlimmingResult",
           "NetworkSlimmingSettings"]

logger = logging.getLogger(__name__)


class NetworkSlimmingSettings(PluginSettings):
    """The keys of a ``pruning_type="network_slimming"`` config entry."""

    target_sparsity: float = Field(ge=0, lt=1, description=(
        "fraction of the channels after the selected convolutions to prune, in [0, 1); each layer keeps at least one"))
    pattern: str = Field("1xchannel", max_length=50, description="must be '1xchannel': whole output channels")
    pruning_scope: Literal["global", "local"] = Field("global", description=(
        "'global' ranks the BatchNorm scales of all the entry's layers together (INC's default, the paper's "
        "choice), 'local' each layer's"))

    @field_validator("pattern")
    @classmethod
    def _channel_pattern(cls, pattern: str) -> str:
        return require_pattern(pattern, "network_slimming", "1xchannel", "removes whole output channels")


@dataclasses.dataclass(frozen=True)
class NetworkSlimmingResult(PruningResult):
    """``keep``: {BN name: keep mask [C] bool}; ``batchnorm_of``: {conv name: the BN name after it}."""

    keep: dict[str, Tensor]
    batchnorm_of: dict[str, str]

    def slimmed(self, model: nn.Module) -> nn.Module:
        """A physically smaller copy of the pruned CNN (``models.surgery_cnn.slim_cnn_channels``)."""
        return slim_cnn_channels(model, self.keep)


class NetworkSlimmingPruner(OneShotPruner):
    """INC's view of a network_slimming entry (``PRUNERS["pt_network_slimming"]``): the zeroed filters as masks."""


class NetworkSlimmingPruning(OneShotPruning):
    """One-shot network slimming: mask the channels with the smallest BatchNorm ``|gamma|`` (see the module doc)."""

    pruner_class = NetworkSlimmingPruner
    result_class = NetworkSlimmingResult

    def inspect_model(self, model: nn.Module, infos: Sequence[Mapping[str, Any]]) -> None:
        self._pairs = conv_bn_pairs(model)
        self._batchnorm_of: dict[str, str] = {}

    def layers_to_prune(self, index: int, info: Mapping[str, Any], settings: NetworkSlimmingSettings,
                        selected: dict[str, nn.Module]) -> dict[str, nn.Module]:
        with_bn = {name: module for name, module in selected.items() if name in self._pairs}
        without = [name for name in selected if name not in self._pairs]
        if not with_bn:
            raise PruningConfigError(
                f"network_slimming ranks channels by the scale of the BatchNorm that follows each convolution, and "
                f"none of the layers selected by config entry {index} "
                f"({', '.join(map(repr, list(selected)[:EXAMPLE_NAMES]))}) is directly followed by a BatchNorm layer"
            )
        if without:
            logger.warning("network_slimming: these selected layers have no BatchNorm after them, so stay dense: %s",
                           without)
        self._batchnorm_of.update({name: self._pairs[name] for name in with_bn})
        return with_bn

    def prune(self, dataloader, loss_func) -> dict[str, Any]:
        model, batchnorm_of = self._model, self._batchnorm_of
        for name in batchnorm_of.values():  # what the ranking reads, then the rest of the model
            check_tensor(model.get_submodule(name).weight.detach(), name, "BatchNorm scale (gamma)",
                         "network_slimming", "check the model file and the sparsity training that produced it")
        check_parameters(model, "network_slimming")
        kept: dict[str, Tensor] = {}
        for pruner, settings in zip(self.pruners, self.settings):
            scales = {batchnorm_of[name]: model.get_submodule(batchnorm_of[name]).weight.detach().abs()
                      for name in pruner.modules}
            try:
                keep = prune_lowest_channels(scales, settings.target_sparsity, settings.pruning_scope)
            except ValueError as error:
                raise PruningConfigError(f"network_slimming: {error}") from error
            masks = mask_bn_channels(model, keep)
            for name in pruner.modules:
                pruner.masks[name] = masks[name]
            kept.update(keep)
            logger.info("network_slimming: pruned %s channels", {n: int((~m).sum()) for n, m in keep.items()})
        return {"keep": kept, "batchnorm_of": dict(batchnorm_of)}


class BNL1Regularizer(BaseReg):
    """INC regularizer ``reg_type: "bn_l1"``: adds ``reg_coeff * sign(gamma)`` to the gradient of every BatchNorm
    scale that directly follows one of the pruner's layers, before each optimizer step (network slimming's
    sparsity training)."""

    def __init__(self, config, modules, pattern, coeff):
        super().__init__(config, modules, pattern)
        if coeff is None or float(coeff) <= 0:
            raise PruningConfigError(
                f"reg_type 'bn_l1' needs reg_coeff > 0 (the L1 weight lambda), got {coeff!r}. INC 3.7.1 reads it from "
                f"the entry's `parameters: {{'reg_coeff': ...}}` and overwrites a bare `reg_coeff` key with its default"
            )
        self.coeff = float(coeff)
        self.batchnorms: dict[str, nn.Module] | None = None
        self._finder = ModelFinder(modules.values(), self._attach)

    def _attach(self, model: nn.Module) -> None:
        names = {id(module): name for name, module in model.named_modules()}
        pairs = conv_bn_pairs(model)
        layer_names = [names[id(module)] for module in self.modules.values()]
        self.batchnorms = {pairs[n]: model.get_submodule(pairs[n]) for n in layer_names if n in pairs}

    def on_before_optimizer_step(self) -> None:
        if self.batchnorms is None:
            raise RuntimeError("reg_type 'bn_l1' has not seen a forward pass of the model before the optimizer step")
        if not self.batchnorms:
            raise PruningConfigError(
                "reg_type 'bn_l1' penalises the BatchNorm scales after the selected layers, and no selected layer "
                "is directly followed by a BatchNorm layer: select the convolutions (e.g. pruning_op_types ['Conv'])"
            )
        add_bn_l1_subgradient_(self.batchnorms.values(), self.coeff)

    def __del__(self):
        with contextlib.suppress(Exception):
            self._finder.remove()
