"""Kwon et al. (2022) post-training head/neuron pruning as INC pruning type "mask_search".

``inc_plugins.prepare_pruning(model, pruning_config(pruning_configs=[{"pruning_type": "mask_search",
"target_sparsity": 0.4, ...}]), dataloader=labelled_batches)`` builds ``MaskSearchPruning``, which at construction
runs ``inc_plugins.post_training.prune_post_training`` (Fisher -> FLOPs/latency search -> rearrangement -> mask
tuning) and leaves the model pruned. Config entry keys (see ``KwonSettings``): ``target_sparsity`` (fraction of
head+FFN FLOPs, or of table latency, to remove), ``constraint`` ("flops" | "latency"), ``latency_table``,
``latency_backend``, ``allow_foreign_latency_table``, ``seq_len``, ``num_samples``, ``rearrange``, ``tune``,
``per_sample_fisher``, ``damp``, ``max_abs_scale``. ``pattern``, ``op_names`` and ``excluded_op_names`` do not
apply: the search covers every attention unit and FFN neuron of every block, and nothing else.

Where the result lives:

* in the weights: the masks are folded in (``structure_masks.fold_structure_masks``): pruned heads' query/key/value
  rows and output-projection columns, and pruned neurons' FFN-input rows and FFN-output columns, are zero; tuned
  scales multiply the kept columns of the output projections. The model is a plain model (no hooks).
* ``model.inc_structure_masks`` (and ``pruning.head_mask`` / ``pruning.neuron_mask``): a dict with the float
  ``head_mask`` [n_layers, n_heads] and ``neuron_mask`` [n_layers, n_neurons] (0 = pruned, else the tuned scale),
  ``scales_folded=True``, and the settings. ``inc_plugins.slim(model)`` reads it.
* ``pruning.pruners``: two INC pruners whose ``.masks`` are the zeroed rows (pattern "1xchannel": query, key, value,
  FFN input layers) and columns (pattern "channelx1": attention output, FFN output) in each weight's shape, so INC's
  ``get_sparsity_ratio`` report (``pruning.report``, and ``on_train_end``) counts exactly the zeroed weights.
  Note that it reports *weight* sparsity over all Linear layers, not the FLOPs fraction ``target_sparsity`` sets;
  ``pruning.result`` has the MACs (or seconds) kept, the budget and the dense cost.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from neural_compressor.compression.pruner.patterns import get_pattern
from neural_compressor.compression.pruner.pruners.base import PytorchBasePruner
from neural_compressor.compression.pruner.pruning import BasePruning
from neural_compressor.compression.pruner.utils import get_sparsity_ratio
from torch import nn

from inc_plugins.models.structure_masks import UnitSlice, fold_structure_masks, mask_structure
from inc_plugins.post_training import KwonResult, KwonSettings, prune_post_training, settings_from_config

from .config_checks import PruningConfigError
from .one_shot import register_one_shot_pruning

__all__ = ["STRUCTURE_MASKS_ATTRIBUTE", "MASK_SEARCH_CONFIG_KEYS", "MaskSearchPruner", "MaskSearchPruning", "slim"]

logger = logging.getLogger(__name__)

STRUCTURE_MASKS_ATTRIBUTE = "inc_structure_masks"
_ROW_PATTERN, _COLUMN_PATTERN = "1xchannel", "channelx1"


class MaskSearchPruner(PytorchBasePruner):
    """An INC pruner over the Linear layers whose rows (``axis="out"``) or columns (``axis="in"``) ``mask_search``
    zeroed. Pruning is already done: ``masks`` hold the result in each weight's shape, ``pattern`` is INC's
    "1xchannel" (rows) or "channelx1" (columns) pattern, and training-loop hooks only keep the zeros in place."""

    def __init__(self, config, slices: list[UnitSlice]):
        super().__init__(config, {unit.name: unit.module for unit in slices})
        for unit in slices:
            weight = unit.module.weight
            keep = unit.keep.to(weight.device)
            self.masks[unit.name] = (keep.unsqueeze(1) if unit.axis == "out" else keep.unsqueeze(0)).expand_as(weight).clone()

    def _init(self) -> None:
        self.pattern = get_pattern(self.config, self.modules)

    def update_masks(self, local_step) -> None:
        """Nothing to update: the masks were found at construction."""


def _pruner_config(info, pattern: str):
    config = copy.deepcopy(info)
    config["pattern"] = pattern
    return config


# the config keys KwonSettings reads beyond INC's own (target_sparsity is INC's)
MASK_SEARCH_CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(KwonSettings) if f.name != "target_sparsity")


# pattern does not apply (the search picks whole heads and neurons); "1xchannel" says what it prunes
@register_one_shot_pruning("mask_search", config_keys=MASK_SEARCH_CONFIG_KEYS, default_pattern=_ROW_PATTERN)
class MaskSearchPruning(BasePruning):
    """One-shot "mask_search" over one config entry; prunes at construction (see the module docstring).

    Built by ``inc_plugins.prepare_pruning`` as ``MaskSearchPruning(pruner_infos, model, dataloader, loss_func,
    device)``. ``loss_func(outputs, batch) -> scalar`` replaces ``outputs.loss`` for the Fisher gradients.
    ``device``: when given and different from the model's, the model runs there and is moved back afterwards.
    """

    def __init__(self, config, model: nn.Module, dataloader=None, loss_func=None, device=None):
        if dataloader is None:
            raise PruningConfigError("mask_search prunes from labelled calibration batches: pass dataloader=")
        if len(config) != 1:
            raise PruningConfigError(
                f"mask_search searches one set of head and neuron masks for the whole model: give exactly one "
                f"pruning_configs entry with pruning_type 'mask_search', got {len(config)}"
            )
        info = config[0]
        for key in ("op_names", "excluded_op_names"):
            if info.get(key):
                logger.warning("mask_search ignores %s=%r: it searches every attention unit and FFN neuron", key, info[key])
        try:
            self.settings = settings_from_config(info)
        except ValueError as error:
            raise PruningConfigError(str(error)) from error
        mask_structure(model)  # UnsupportedModelError (naming the supported families) before any work
        super().__init__(config, model)
        self.result: KwonResult = self._search(dataloader, loss_func, device)
        self.head_mask, self.neuron_mask = self.result.head_mask, self.result.neuron_mask
        slices = fold_structure_masks(model, self.head_mask, self.neuron_mask)
        setattr(model, STRUCTURE_MASKS_ATTRIBUTE, {
            "head_mask": self.head_mask.clone(),
            "neuron_mask": self.neuron_mask.clone(),
            "scales_folded": True,
            "constraint": self.settings.constraint,
            "target_sparsity": self.settings.target_sparsity,
        })
        self.pruners = [
            MaskSearchPruner(_pruner_config(info, _ROW_PATTERN), [s for s in slices if s.axis == "out"]),
            MaskSearchPruner(_pruner_config(info, _COLUMN_PATTERN), [s for s in slices if s.axis == "in"]),
        ]
        info["modules"] = [s.name for s in slices]
        info["len_of_modules"] = len(slices)
        self.report = get_sparsity_ratio(self.pruners, self._model)

    def _generate_pruners(self) -> list:
        return []  # built from the search's result, once it exists

    def _search(self, dataloader, loss_func, device) -> KwonResult:
        original = next(self._model.parameters()).device
        target = torch.device(device) if device is not None else original
        if target != original:
            self._model.to(target)
        try:
            return prune_post_training(self._model, dataloader, self.settings, loss_func)
        finally:
            if target != original:
                self._model.to(original)

    def on_train_begin(self, dataloader=None) -> None:
        logger.info("mask_search pruned at construction; on_train_begin() has nothing to do")


def slim(model: nn.Module) -> nn.Module:
    """The physically smaller model: ``inc_plugins.models.slimming.slim_model`` with the masks "mask_search" stored
    on ``model``. The scales are already folded into the weights, so slimming gets 0/1 masks (it must not scale
    twice). The returned model no longer carries the masks (its shapes no longer match them); when slimming
    returns a new model, the original keeps them."""
    stored = getattr(model, STRUCTURE_MASKS_ATTRIBUTE, None)
    if stored is None:
        raise ValueError(
            f"{type(model).__name__} has no {STRUCTURE_MASKS_ATTRIBUTE}: prune it first with "
            f"inc_plugins.prepare_pruning(model, config, dataloader=...) and pruning_type 'mask_search'"
        )
    from inc_plugins.models.slimming import slim_model

    head_mask, neuron_mask = stored["head_mask"], stored["neuron_mask"]
    if stored.get("scales_folded", False):
        head_mask, neuron_mask = (head_mask != 0).float(), (neuron_mask != 0).float()
    slimmed = slim_model(model, head_mask, neuron_mask)
    slimmed.__dict__.pop(STRUCTURE_MASKS_ATTRIBUTE, None)
    return slimmed
