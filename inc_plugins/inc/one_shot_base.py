"""The one life cycle of every one-shot plugin pruning type, and what it returns.

``inc_plugins.prepare_pruning`` builds a registered pruning class as ``cls(pruner_infos, model, dataloader,
loss_func, device)`` (one INC-processed dict per config entry of that type), and ``OneShotPruning.__init__`` does
what every type shares, in this order:

1. refuse a missing dataloader (types registered with ``needs_data=True``);
2. parse each entry's settings once with the type's settings model (``self.settings[i]``);
3. ``inspect_model(model, infos)``: the type refuses a model it cannot prune, keeps what it needs (e.g. its blocks);
4. select each entry's layers as INC does (task heads kept dense), ``layers_to_prune`` narrows them, a layer
   selected by two entries is refused, and one INC pruner per entry is built through INC's ``get_pruner``
   (``PRUNERS["pt_<type>"]``, the class's ``pruner_class``) so INC's report and callbacks work;
5. ``prune(dataloader, loss_func)`` on ``device`` (the model is moved there and back): the type zeroes the weights
   and fills each pruner's ``masks``; it returns the type-specific fields of its ``result_class``;
6. ``self.result`` (a ``PruningResult``) and ``self.report`` (INC's sparsity report, also logged by INC).

A type's file holds only what differs: its settings model, ``prune`` and, if needed, ``inspect_model``,
``layers_to_prune`` and a ``PruningResult`` subclass.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from neural_compressor.compression.pruner.patterns import get_pattern
from neural_compressor.compression.pruner.pruners import get_pruner
from neural_compressor.compression.pruner.pruners.base import BasePruner, PytorchBasePruner
from neural_compressor.compression.pruner.pruning import BasePruning
from neural_compressor.compression.pruner.utils import get_sparsity_ratio
from torch import nn

from inc_plugins.execution.streamed_model import block_stream
from inc_plugins.plugin_settings import PluginSettings

from .config_checks import PruningConfigError
from .layer_selection import select_layers, task_head_names

__all__ = ["OneShotPruner", "OneShotPruning", "PruningResult", "model_on", "slim", "sparsity_report"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruningResult:
    """What a one-shot plugin pruning did: ``layer_sparsity`` is {layer name: fraction of its weights the mask
    prunes}, for every layer its pruners hold. Types add their own fields in subclasses."""

    pruning_type: str
    layer_sparsity: dict[str, float]

    def slimmed(self, model: nn.Module) -> nn.Module:
        """The physically smaller model (``inc_plugins.slim``); only types that prune whole structures have one."""
        raise ValueError(
            f"a {self.pruning_type!r} result has no structures to remove: inc_plugins.slim takes the result of "
            f"'mask_search', 'flap', 'wanda_sp' or 'structured_magnitude' (attention heads, FFN neurons) or "
            f"'network_slimming' (CNN channels)"
        )


def slim(model: nn.Module, result: PruningResult) -> nn.Module:
    """The physically smaller model: the structures that ``result``'s pruning zeroed in ``model`` removed.

    ``result`` is ``pruning.result`` of the ``inc_plugins.prepare_pruning`` call that pruned ``model``:
    mask_search, flap, wanda_sp or structured_magnitude (attention heads and FFN neurons;
    ``models.surgery_transformers.slim_model``) or network_slimming
    (CNN channels; a copy, ``models.surgery_cnn.slim_cnn_channels``). The outputs stay those of the pruned model.
    """
    if not isinstance(result, PruningResult):
        raise TypeError(
            f"slim(model, result) takes the result of a one-shot plugin pruning (`pruning.result` of "
            f"inc_plugins.prepare_pruning), got {type(result).__name__}"
        )
    return result.slimmed(model)


def layer_sparsity(pruners) -> dict[str, float]:
    """{layer name: fraction of its weights each pruner's mask prunes} (``mask_sparsity`` where a pruner recorded it
    and dropped the mask)."""
    return {name: pruner.mask_sparsity[name] if name in pruner.mask_sparsity else float((mask == 0).sum()) / mask.numel()
            for pruner in pruners for name, mask in pruner.masks.items()}


def sparsity_report(pruners, model: nn.Module):
    """INC's sparsity report (INC logs it); None if INC's report divides by zero, which it does for N:M patterns
    when no layer's stored weight has a multiple of M columns (e.g. GPT-2 Conv1D layers, stored [in, out])."""
    try:
        return get_sparsity_ratio(pruners, model)
    except ZeroDivisionError:
        logger.warning("INC's sparsity report cannot be computed for these layers and this pattern")
        return None


@contextlib.contextmanager
def model_on(model: nn.Module, device: str | torch.device | None) -> Iterator[None]:
    """Within the block the model is on ``device`` (None: where it is); afterwards it is back where it was."""
    original = next(model.parameters()).device
    target = torch.device(device) if device is not None else original
    if target != original:
        logger.info("moving the model to %s to prune it", target)
        model.to(target)
    try:
        yield
    finally:
        if target != original:
            model.to(original)


class OneShotPruner(PytorchBasePruner):
    """INC pruner of one config entry of a one-shot plugin type: ``.modules``, ``.masks`` (bool in each weight's
    layout, True = kept; filled by the pruning class), ``.pattern`` (INC's, from ``get_pattern``) and
    ``.settings`` (the entry's settings), so INC's sparsity report and training callbacks work on it.

    It has no training-loop schedule: built by INC's own ``prepare_pruning(..., optimizer=...)`` it refuses to
    start."""

    def __init__(self, config, modules):
        # INC's PytorchBasePruner.__init__, but each all-True mask is made as bool where the weight is: INC makes it
        # as float32 on the CPU first, which for a streamed model's meta weights allocated the layers in float32
        BasePruner.__init__(self, config, modules)
        for name, module in self.modules.items():
            self.masks[name] = torch.ones(module.weight.shape, dtype=torch.bool, device=module.weight.device)
        self._init()

    def _init(self) -> None:
        self.pattern = get_pattern(self.config, self.modules)
        self.settings: PluginSettings | None = None  # set by the pruning class
        self.mask_sparsity: dict[str, float] = {}  # per layer, where a pruner records it (a streamed model's masks)
        self.pruned = False

    def on_train_begin(self, dataloader=None) -> None:
        if not self.pruned:
            pruning_type = self.config["pruning_type"]
            raise RuntimeError(
                f"pt_{pruning_type} prunes one-shot: call inc_plugins.prepare_pruning(model, config, "
                f"dataloader=...) with pruning_type {pruning_type!r}"
            )


class OneShotPruning(BasePruning):
    """Base of the one-shot plugin pruning classes; prunes at construction (see the module docstring).

    ``settings[i]``, ``pruners[i]`` and ``pruners_info[i]`` belong to config entry ``i``; ``result`` is what the
    pruning did, ``report`` INC's sparsity report. Subclasses write ``prune`` and may override ``inspect_model``
    and ``layers_to_prune``; ``pruner_class`` and ``result_class`` name their INC pruner and their result.
    """

    pruner_class: ClassVar[type[OneShotPruner]] = OneShotPruner
    result_class: ClassVar[type[PruningResult]] = PruningResult
    # set by one_shot.register_one_shot_pruning
    pruning_type: ClassVar[str] = ""
    settings_model: ClassVar[type[PluginSettings]] = PluginSettings
    needs_data: ClassVar[bool] = True
    inc_registry_name: ClassVar[str] = ""
    # whether ``prune`` holds one block at a time (``execution.streamed_model``), so a streamed model can be pruned
    streams: ClassVar[bool] = False
    # whether the type removes whole attention units and FFN neurons, so ``inc_plugins.slim`` (and a recipe's
    # ``slim: true``) can take its result
    prunes_structures: ClassVar[bool] = False
    # whether ``prune`` combines its statistics across torch.distributed ranks (``execution.distributed``), so every
    # rank derives the same masks from its own share of the calibration data
    combines_across_ranks: ClassVar[bool] = False

    def __init__(self, config, model: nn.Module, dataloader=None, loss_func=None, device=None):
        if dataloader is None and self.needs_data:
            raise PruningConfigError(f"{self.pruning_type} prunes one-shot from calibration data: pass dataloader=")
        self.settings = [self.settings_model.from_config(info) for info in config]
        self.inspect_model(model, config)
        super().__init__(config, model)
        with model_on(model, device):
            details = self.prune(dataloader, loss_func) or {}
        for pruner in self.pruners:
            for name, module in pruner.modules.items():
                pruner.masks[name] = pruner.masks[name].to(module.weight.device)
            pruner.pruned = True
        self.result = self.result_class(pruning_type=self.pruning_type, layer_sparsity=layer_sparsity(self.pruners),
                                        **details)
        # INC's report reads every weight: a streamed model's blocks are back in the checkpoint (see ``result``)
        self.report = sparsity_report(self.pruners, model) if block_stream(model) is None else None

    # --- what a pruning type writes -------------------------------------------------------------------------

    def inspect_model(self, model: nn.Module, infos: Sequence[Mapping[str, Any]]) -> None:
        """Refuse a model (or config entries) this type cannot prune before any work; keep what it needs later."""

    def layers_to_prune(self, index: int, info: Mapping[str, Any], settings: PluginSettings,
                        selected: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The layers config entry ``index`` prunes, from the ones it ``selected``; raise PruningConfigError for
        a selection this type cannot prune. Default: all of them."""
        return selected

    def prune(self, dataloader, loss_func) -> Mapping[str, Any] | None:
        """Prune ``self._model`` (already on the requested device): zero the weights and set every
        ``pruner.masks[name]`` (bool, the weight's shape, True = kept). Return the fields ``result_class`` adds
        to ``PruningResult``, or None."""
        raise NotImplementedError

    # --- the shared steps -----------------------------------------------------------------------------------

    def _generate_pruners(self) -> list[OneShotPruner]:
        pruners, owner = [], {}
        heads = task_head_names(self._model)
        for index, (info, settings) in enumerate(zip(self.pruners_info, self.settings)):
            layers = self.layers_to_prune(index, info, settings, select_layers(info, self._model, heads))
            for name in layers:
                if name in owner:
                    raise PruningConfigError(
                        f"layer {name!r} is selected by both config entries {owner[name]} and {index}: "
                        f"narrow their op_names / excluded_op_names"
                    )
                owner[name] = index
            pruner_info = info
            if self.inc_registry_name != self.pruning_type:  # a type INC also has: its pruner is "pt_plugin_<type>"
                pruner_info = copy.copy(info)
                pruner_info["pruning_type"] = self.inc_registry_name
            pruner = get_pruner(pruner_info, layers)  # INC's PRUNERS["pt_<type>"]
            if not isinstance(pruner, self.pruner_class):  # pragma: no cover - registry misconfiguration
                raise RuntimeError(f"INC built {type(pruner).__name__} for pruning_type {self.pruning_type!r}, "
                                   f"expected {self.pruner_class.__name__}")
            pruner.settings = settings
            info["modules"] = list(layers)
            info["len_of_modules"] = len(layers)
            logger.info("%s config entry %d prunes %d layers: %s", self.pruning_type, index, len(layers), list(layers))
            pruners.append(pruner)
        return pruners

    def on_train_begin(self, dataloader=None) -> None:
        logger.info("%s pruning is done at construction; on_train_begin() has nothing to do", self.pruning_type)
