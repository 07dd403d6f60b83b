"""Network trimming's score for INC's training-aware pruners: the criterion "apoz".

``CRITERIA["apoz"]`` (``pruning_type: "apoz"``, ``pattern: "1xchannel"``, ``end_step >= 1``, optional
``apoz_threshold``): score = 1 - APoZ of each output channel, accumulated over every forward pass since the pruner
was built (training steps, not a separate calibration set), so INC's schedulers prune the channels with the
highest APoZ gradually. On a Conv2d the score is the same for all of a filter's ``[1, in]`` blocks, so INC's
threshold prunes whole filters (it may overshoot the target by part of a filter's tie). INC masks only the layers'
weights (a BatchNorm after a pruned conv keeps its shift). Scores are empty (INC skips that pruning step) until a
forward pass has been seen; ``criterion.remove_hooks()`` stops the counting early (it stops by itself after
``end_step``). Put its keys in the ``pruning_configs`` entry: INC does not copy unknown global keys into entries.

INC never gives a criterion the model: it is found at the first forward pass (``find_model.ModelFinder``).
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field, field_validator
from torch import nn

from inc_plugins.execution.apoz_monitor import APoZMonitor
from inc_plugins.plugin_settings import PluginSettings

from .config_checks import PruningConfigError, require_pattern
from .find_model import ModelFinder
from .hook_fed_criterion import HookFedCriterion
from .network_trimming import CHANNEL_LAYERS, APoZThreshold

__all__ = ["APoZCriterion", "APoZCriterionSettings"]

logger = logging.getLogger(__name__)


class APoZCriterionSettings(PluginSettings):
    """The keys the "apoz" criterion reads from its INC config entry."""

    pattern: str = Field("1xchannel", max_length=50, description="must be '1xchannel': whole output channels")
    apoz_threshold: APoZThreshold = Field(None, description=(
        "activations with |x| <= apoz_threshold count as zeros; needed for GELU/SiLU, null: 0 for ReLU-like ones"))

    @field_validator("pattern")
    @classmethod
    def _channel_pattern(cls, pattern: str) -> str:
        return require_pattern(pattern, "apoz", "1xchannel", "scores output channels/neurons")


class APoZCriterion(HookFedCriterion):
    """INC criterion for training-aware pruning: score = 1 - APoZ per output channel (``pattern "1xchannel"``).

    Activations are counted at each layer's following activation (``execution.apoz_monitor.APoZMonitor``) in every
    forward pass from the first one after construction until the optimizer step after ``end_step``; then the
    hooks are removed (``remove_hooks()`` removes them earlier).
    """

    pruning_type = "apoz"

    def __init__(self, modules, config, pattern):
        super().__init__(modules, config, pattern, seen="activations")
        settings = APoZCriterionSettings.from_config(config)
        unsupported = [f"{n!r} ({type(m).__name__})" for n, m in modules.items() if not isinstance(m, CHANNEL_LAYERS)]
        if unsupported:
            raise PruningConfigError(
                f"pruning_type 'apoz' scores Linear and Conv layers; exclude {', '.join(unsupported)}"
            )
        self.threshold = settings.apoz_threshold
        self.monitor: APoZMonitor | None = None
        self._finder = ModelFinder(modules.values(), self._attach)

    def _attach(self, model: nn.Module) -> None:
        self.monitor = APoZMonitor(model, self.modules, self.threshold).attach()

    def on_step_begin(self) -> None:
        self.scores = {}
        if self.monitor is None:
            logger.info("apoz: no forward pass seen yet; this pruning step is skipped")
            return
        unseen = self.monitor.unseen()
        if len(unseen) == len(self.modules):
            logger.info("apoz: no activations counted yet; this pruning step is skipped")
            return
        try:
            apoz = self.monitor.apoz()  # raises, naming the layers that never reach an activation
        except ValueError as error:
            raise PruningConfigError(f"apoz: {error}") from error
        with torch.no_grad():
            for name, module in self.modules.items():
                keep_score = (1.0 - apoz[name]).to(module.weight.device, module.weight.dtype)
                self.set_score(name, keep_score.reshape(-1, *([1] * (module.weight.dim() - 1))).expand_as(module.weight))

    def remove_hooks(self) -> None:
        self._finder.remove()
        if self.monitor is not None:
            self.monitor.detach()
