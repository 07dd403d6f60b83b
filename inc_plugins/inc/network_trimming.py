"""Network trimming (Hu et al. 2016) as the one-shot INC pruning type "network_trimming".

Runs the calibration batches, measures each selected layer's APoZ at the activation that follows it
(``execution.apoz_monitor``, math in ``algorithms.apoz``), and prunes the output channels/neurons with the highest
APoZ: the layer's output filters/rows and bias entries are zeroed, and so are the scale and shift of a BatchNorm
between the layer and its activation, so a pruned channel outputs exactly zero. The paper alternates pruning and
fine-tuning; one call is one pruning step (the recipe iterates).

``pattern`` is ``"1xchannel"``, which in INC is a layer's output channels/neurons. For a Linear weight
``[out, in]`` INC's block is one output row; for a Conv2d INC reshapes the weight to ``[out, kh * kw * in]`` and a
block is ``[1, in]``, one kernel position of one output filter. Whole filters are zeroed, which INC's report counts
as all of that filter's blocks, so its block-wise sparsity equals the fraction of filters removed.
``target_sparsity`` is the fraction of *channels* removed; ``pruning_scope`` ``"global"`` (INC's default) ranks
channels across the entry's layers, ``"local"`` per layer; at least one channel per layer is always kept.
``apoz_threshold``: outputs with ``|x| <= t`` count as zero; needed for smooth activations (GELU, SiLU: an
extension of the paper), 0 by default for ReLU-like ones. Select layers that are followed by an activation (CNN
convs; for BERT-like FFNs ``op_names: ["intermediate.dense"]``); others are an error naming them. ``token`` batches
with an ``attention_mask`` count only real tokens.

Layer selection follows INC (``op_names`` / ``excluded_op_names`` regexes, ``pruning_op_types`` substrings of class
names); task heads (``classifier``, ``lm_head``, ...; for models no adapter knows, the last Linear, as INC does) are
excluded by exact name. The training-aware form is the criterion "apoz" (``apoz_criterion``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from inc_plugins.algorithms.apoz import channels_to_prune
from inc_plugins.execution.apoz_monitor import ActivationSite, APoZMonitor
from inc_plugins.finite_checks import NonFiniteError, check_batch, check_parameters
from inc_plugins.models.batch_inputs import model_call
from inc_plugins.plugin_settings import PluginSettings

from .config_checks import PruningConfigError, require_pattern
from .one_shot_base import OneShotPruner, OneShotPruning, PruningResult

__all__ = ["CHANNEL_LAYERS", "APoZThreshold", "NetworkTrimmingPruner", "NetworkTrimmingPruning",
           "NetworkTrimmingResult", "NetworkTrimmingSettings"]

logger = logging.getLogger(__name__)

# the layers whose output channels can be scored and zeroed
CHANNEL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

APoZThreshold = Annotated[float, Field(ge=0, le=1e6)] | None


class NetworkTrimmingSettings(PluginSettings):
    """The keys of a ``pruning_type="network_trimming"`` config entry."""

    target_sparsity: float = Field(ge=0, lt=1, description=(
        "fraction of the output channels/neurons to prune, in [0, 1); each layer keeps at least one"))
    pattern: str = Field("1xchannel", max_length=50, description="must be '1xchannel': whole output channels")
    pruning_scope: Literal["global", "local"] = Field("global", description=(
        "'global' ranks the channels of all the entry's layers together (INC's default), 'local' each layer's"))
    apoz_threshold: APoZThreshold = Field(None, description=(
        "activations with |x| <= apoz_threshold count as zeros; needed for GELU/SiLU, null: 0 for ReLU-like ones"))

    @field_validator("pattern")
    @classmethod
    def _channel_pattern(cls, pattern: str) -> str:
        return require_pattern(pattern, "network_trimming", "1xchannel", "removes whole output channels/neurons")


@dataclasses.dataclass(frozen=True)
class NetworkTrimmingResult(PruningResult):
    """``apoz``: {layer: APoZ [C] float64}; ``keep``: {layer: keep mask [C] bool}; ``sites``: {layer: where its
    APoZ was read (the activation module, the BatchNorm layers passed)}."""

    apoz: dict[str, Tensor]
    keep: dict[str, Tensor]
    sites: dict[str, ActivationSite]


class NetworkTrimmingPruner(OneShotPruner):
    """INC's view of a network_trimming entry (``PRUNERS["pt_network_trimming"]``): the zeroed channels as masks."""


@torch.no_grad()
def zero_output_channels(module: nn.Module, keep: Tensor) -> Tensor:
    """Zero the output channels of ``module`` that ``keep`` [C] drops (weight and bias); the mask in the weight's
    layout (bool)."""
    shape = module.weight.shape
    mask = keep.to(module.weight.device).bool().reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
    module.weight.mul_(mask)
    if getattr(module, "bias", None) is not None:
        module.bias.mul_(keep.to(module.bias.device, module.bias.dtype))
    return mask


class NetworkTrimmingPruning(OneShotPruning):
    """One-shot network trimming: prune the output channels/neurons with the highest APoZ (see the module doc)."""

    pruner_class = NetworkTrimmingPruner
    result_class = NetworkTrimmingResult

    def layers_to_prune(self, index: int, info: Mapping[str, Any], settings: NetworkTrimmingSettings,
                        selected: dict[str, nn.Module]) -> dict[str, nn.Module]:
        unsupported = [f"{n!r} ({type(m).__name__})" for n, m in selected.items() if not isinstance(m, CHANNEL_LAYERS)]
        if unsupported:
            raise PruningConfigError(
                f"network_trimming scores output channels of Linear and Conv1d/2d/3d layers; config entry {index} "
                f"also selects {', '.join(unsupported)}: exclude them with excluded_op_names"
            )
        return selected

    def _measure(self, dataloader, monitors: Sequence[APoZMonitor]) -> None:
        """Runs every calibration batch through the model (eval mode) with the APoZ monitors attached."""
        model = self._model
        was_training = model.training
        model.eval()
        seen = 0
        try:
            with contextlib.ExitStack() as stack:
                for monitor in monitors:
                    stack.enter_context(monitor)
                for batch in dataloader:
                    check_batch(batch, seen, "network_trimming")
                    args, kwargs = model_call(model, batch)
                    for monitor in monitors:
                        monitor.valid_positions = kwargs.get("attention_mask")
                    model(*args, **kwargs)
                    seen += 1
        except NonFiniteError:
            raise
        except ValueError as error:
            raise PruningConfigError(str(error)) from error
        finally:
            model.train(was_training)
        if seen == 0:
            raise PruningConfigError("network_trimming measures APoZ on calibration batches: the dataloader is empty")

    @torch.no_grad()
    def prune(self, dataloader, loss_func) -> dict[str, Any]:
        model = self._model
        monitors = [APoZMonitor(model, pruner.modules, settings.apoz_threshold)
                    for pruner, settings in zip(self.pruners, self.settings)]
        check_parameters(model, "network_trimming")
        self._measure(dataloader, monitors)

        found: dict[str, dict] = {"apoz": {}, "keep": {}, "sites": {}}
        for pruner, settings, monitor in zip(self.pruners, self.settings, monitors):
            try:
                apoz = monitor.apoz()
                keep = channels_to_prune(apoz, settings.target_sparsity, settings.pruning_scope)
            except ValueError as error:
                raise PruningConfigError(f"network_trimming: {error}") from error
            for name, module in pruner.modules.items():
                pruner.masks[name] = zero_output_channels(module, keep[name])
                for bn_name in monitor.sites[name].batchnorms:
                    bn = model.get_submodule(bn_name)
                    bn.weight.mul_(keep[name].to(bn.weight.device, bn.weight.dtype))
                    if bn.bias is not None:
                        bn.bias.mul_(keep[name].to(bn.bias.device, bn.bias.dtype))
            found["apoz"].update(apoz)
            found["keep"].update(keep)
            found["sites"].update(monitor.sites)
            logger.info("network_trimming: pruned %s channels",
                        {name: int((~mask).sum()) for name, mask in keep.items()})
        return found
