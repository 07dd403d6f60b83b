"""What the structured types (mask_search, flap, wanda_sp, structured_magnitude) share at INC's face: the one config
entry they take, and the INC pruners of the whole heads and FFN neurons they zeroed
(``structure_masks.fold_structure_masks``).

Two pruners: one whose ``.masks`` are the zeroed rows of the query, key, value and FFN input layers (pattern
"1xchannel"), one whose masks are the zeroed columns of the attention and FFN output projections (pattern
"channelx1"), each in its weight's shape, so INC's ``get_sparsity_ratio`` report counts exactly the zeroed weights.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from neural_compressor.compression.pruner.pruners import get_pruner

from inc_plugins.models.structure_masks import UnitSlice
from inc_plugins.plugin_settings import PluginSettings

from .config_checks import PruningConfigError
from .one_shot_base import OneShotPruner

__all__ = ["COLUMN_PATTERN", "ROW_PATTERN", "check_whole_model_entry", "zeroed_structure_pruners"]

logger = logging.getLogger(__name__)

ROW_PATTERN, COLUMN_PATTERN = "1xchannel", "channelx1"


def check_whole_model_entry(pruning_type: str, infos: Sequence[Mapping[str, Any]]) -> None:
    """A structured type chooses among every block's attention units and FFN neurons at once: exactly one config
    entry (PruningConfigError otherwise), whose layer selection does not apply (a warning)."""
    if len(infos) != 1:
        raise PruningConfigError(
            f"{pruning_type} chooses one set of heads and FFN neurons for the whole model: give exactly one "
            f"pruning_configs entry with pruning_type {pruning_type!r}, got {len(infos)}"
        )
    for key in ("op_names", "excluded_op_names"):
        if infos[0].get(key):
            logger.warning("%s ignores %s=%r: every block's attention units and FFN neurons are candidates",
                           pruning_type, key, infos[0][key])


def _zeroed_structure_pruner(info: Mapping[str, Any], pattern: str, slices: Sequence[UnitSlice]) -> OneShotPruner:
    """The INC pruner of the rows ("1xchannel") or columns ("channelx1") that were zeroed."""
    config = copy.deepcopy(info)
    config["pattern"] = pattern
    pruner = get_pruner(config, {unit.name: unit.module for unit in slices})
    for unit in slices:
        weight = unit.module.weight
        keep = unit.keep.to(weight.device)
        rows_or_columns = keep.unsqueeze(1) if unit.axis == "out" else keep.unsqueeze(0)
        pruner.masks[unit.name] = rows_or_columns.expand_as(weight).clone()
    return pruner


def zeroed_structure_pruners(info: MutableMapping[str, Any], settings: PluginSettings,
                             slices: Sequence[UnitSlice]) -> list[OneShotPruner]:
    """The row and column pruners of ``slices`` (what ``fold_structure_masks`` returned) for the config entry
    ``info``, which then lists their layers as INC's processed entries do."""
    pruners = [_zeroed_structure_pruner(info, ROW_PATTERN, [s for s in slices if s.axis == "out"]),
               _zeroed_structure_pruner(info, COLUMN_PATTERN, [s for s in slices if s.axis == "in"])]
    for pruner in pruners:
        pruner.settings = settings
    info["modules"] = [s.name for s in slices]
    info["len_of_modules"] = len(slices)
    return pruners
