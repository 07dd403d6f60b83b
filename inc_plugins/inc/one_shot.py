"""Registry of the project's one-shot pruning types, which INC's own `prepare_pruning` cannot route.

INC 3.7.1 sends a config to a one-shot flow only when its pruning type contains "gpt" or "retrain". Each
project pruning class registered here also goes into INC's `PRUNINGS` registry, beside INC's own flows.
"""

import inspect

from neural_compressor import WeightPruningConfig
from neural_compressor.compression.pruner.pruning import PRUNINGS, register_pruning

# Substrings that INC's dispatch treats specially ("gpt", "retrain") or that change which pruner it builds.
RESERVED_SUBSTRINGS = ("gpt", "retrain", "block", "free", "progressive")

# INC's global default pattern ("4x1"), which every INC pruning type gets when no pattern is set
INC_DEFAULT_PATTERN: str = inspect.signature(WeightPruningConfig).parameters["pattern"].default

# pruning_type -> key of its pruning class in INC's PRUNINGS
ONE_SHOT_PRUNINGS: dict[str, str] = {}
# config keys that plugin pruners read beyond INC's own (INC would drop them from global settings)
PLUGIN_CONFIG_KEYS: set[str] = set()
# pruning_type -> the config keys its class reads beyond INC's own
TYPE_CONFIG_KEYS: dict[str, frozenset[str]] = {}
# pruning_type -> the pattern it gets when the config sets none (INC's "4x1" is wrong for most plugin types)
DEFAULT_PATTERNS: dict[str, str] = {}
# one-shot types that prune from the weights alone, so `dataloader=` may be omitted
DATA_FREE_TYPES: set[str] = set()


def register_one_shot_pruning(pruning_type: str, config_keys: tuple[str, ...] = (), needs_data: bool = True,
                              default_pattern: str = INC_DEFAULT_PATTERN):
    """Class decorator: route configs with this `pruning_type` to the class, registered in INC's PRUNINGS.

    The class is built as `cls(pruner_infos, model, dataloader, loss_func, device)` and prunes at construction,
    like INC's `SparseGPTPruning`. `config_keys` names the extra per-config keys the class reads (any other key
    besides INC's is refused); `needs_data=False` lets callers omit the dataloader (it is then None);
    `default_pattern` is the pattern of config entries that set none.
    """
    clashes = [s for s in RESERVED_SUBSTRINGS if s in pruning_type]
    if clashes:
        raise ValueError(f"pruning type {pruning_type!r} contains {clashes}, which INC's dispatch reserves")

    def register(cls):
        key = f"{pruning_type}_pruning"
        register_pruning(key)(cls)
        ONE_SHOT_PRUNINGS[pruning_type] = key
        PLUGIN_CONFIG_KEYS.update(config_keys)
        TYPE_CONFIG_KEYS[pruning_type] = frozenset(config_keys)
        DEFAULT_PATTERNS[pruning_type] = default_pattern
        if not needs_data:
            DATA_FREE_TYPES.add(pruning_type)
        return cls

    return register


def one_shot_pruning_class(pruning_type: str):
    return PRUNINGS[ONE_SHOT_PRUNINGS[pruning_type]]


def default_pattern(pruning_type: str) -> str:
    """The pattern a config entry of this type gets when it sets none: the plugin's own, else INC's "4x1"."""
    return DEFAULT_PATTERNS.get(pruning_type, INC_DEFAULT_PATTERN)


def plugin_keys_read_by(pruning_type: str) -> frozenset[str]:
    """The plugin config keys a pruning type may read: a one-shot type its own; an INC type any plugin's, since
    INC's training-aware pruners host the plugins' criteria (wanda_score, apoz, ...)."""
    return TYPE_CONFIG_KEYS.get(pruning_type, frozenset(PLUGIN_CONFIG_KEYS))


def is_one_shot(pruning_type: str) -> bool:
    """True for types that prune at once from a dataloader; False for INC's training-aware types."""
    return pruning_type in ONE_SHOT_PRUNINGS or "gpt" in pruning_type or "retrain" in pruning_type
