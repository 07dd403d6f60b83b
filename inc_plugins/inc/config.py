"""Builds INC `WeightPruningConfig` objects without INC's shared-default bug.

INC 3.7.1's `WeightPruningConfig.__init__` uses mutable defaults (`pruning_configs=[{}]`, `op_names=[]`, ...),
and `process_config` / `parse_to_prune` write resolved settings into them. A second config created with
defaults then silently inherits the first one's pruning type, sparsity and excluded layers.
"""

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from neural_compressor import WeightPruningConfig


def pruning_config(pruning_configs: Sequence[Mapping[str, Any]] | None = None, **global_settings: Any) -> WeightPruningConfig:
    """A `WeightPruningConfig` whose every list and dict is a fresh copy owned by this config alone.

    Accepts exactly the arguments of `WeightPruningConfig`. Settings in `pruning_configs` entries override the
    global ones for the layers they select, as in INC.
    """
    defaults = {"op_names": [], "excluded_op_names": [], "pruning_op_types": ["Conv", "Linear"]}
    settings = {**defaults, **copy.deepcopy(global_settings)}
    local = [dict(copy.deepcopy(entry)) for entry in (pruning_configs or [{}])]
    return WeightPruningConfig(pruning_configs=local, **settings)


def private_copy(config: WeightPruningConfig) -> WeightPruningConfig:
    """A deep copy, so that INC's in-place processing never writes into lists the caller (or a default) owns."""
    return copy.deepcopy(config)
