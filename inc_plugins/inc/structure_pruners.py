"""The INC pruners of a pruning that zeroed whole heads and FFN neurons (``structure_masks.fold_structure_masks``).

Two pruners: one whose ``.masks`` are the zeroed rows of the query, key, value and FFN input layers (pattern
"1xchannel"), one whose masks are the zeroed columns of the attention and FFN output projections (pattern
"channelx1"), each in its weight's shape, so INC's ``get_sparsity_ratio`` report counts exactly the zeroed weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from neural_compressor.compression.pruner.pruners import get_pruner

from inc_plugins.models.structure_masks import UnitSlice
from inc_plugins.plugin_settings import PluginSettings

from .one_shot_base import OneShotPruner

__all__ = ["COLUMN_PATTERN", "ROW_PATTERN", "zeroed_structure_pruners"]

ROW_PATTERN, COLUMN_PATTERN = "1xchannel", "channelx1"


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
