"""Registry of the project's one-shot pruning types, which INC's own `prepare_pruning` cannot route.

INC 3.7.1 sends a config to a one-shot flow only when its pruning type contains "gpt" or "retrain". Each project
pruning class registered here also goes into INC's `PRUNINGS` registry (and its INC pruner into `PRUNERS`), beside
INC's own flows. The config keys each type accepts are the fields of its settings model (`PluginSettings`).
The project's training-aware types (`register_training_aware_pruning`) need no routing: INC's training-aware flow
builds their pruner from `PRUNERS`; they are registered here for their settings, keys and default pattern.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from neural_compressor import WeightPruningConfig
from neural_compressor.compression.pruner.pruners.base import register_pruner
from neural_compressor.compression.pruner.pruning import register_pruning

from inc_plugins.plugin_settings import PluginSettings

# Substrings that INC's dispatch treats specially ("gpt", "retrain") or that change which pruner it builds.
RESERVED_SUBSTRINGS = ("gpt", "retrain", "block", "free", "progressive")

# INC's global default pattern ("4x1"), which every INC pruning type gets when no pattern is set
INC_DEFAULT_PATTERN: str = inspect.signature(WeightPruningConfig).parameters["pattern"].default

# The keys INC 3.7.1 knows (for others its process_config logs "<key> is not supported for config"):
# WeightPruningConfig's settings plus the ones process_config fills in itself.
INC_CONFIG_KEYS = frozenset(
    name for name, p in inspect.signature(WeightPruningConfig).parameters.items()
    if p.kind is not p.VAR_KEYWORD and name not in ("pruning_configs", "backend")
) | {"criterion_type", "resume_from_pruned_checkpoint", "reg_type", "criterion_reduce_type", "parameters", "reg_coeff"}


@dataclass(frozen=True)
class OneShotType:
    """How `inc_plugins.prepare_pruning` runs one plugin pruning type."""

    pruning_class: type  # built as pruning_class(pruner_infos, model, dataloader, loss_func, device); prunes at once
    settings: type[PluginSettings]  # its config keys (INC's own keys among them, e.g. target_sparsity, are INC's)
    needs_data: bool  # False: it prunes from the weights alone and `dataloader=` may be omitted
    default_pattern: str  # the pattern of config entries that set none (INC's "4x1" is wrong for most plugins)
    inc_builtin: bool  # INC has a type of this name, which runs entries that set none of the plugin's own keys


# pruning_type -> how to run it
ONE_SHOT_TYPES: dict[str, OneShotType] = {}
# pruning_type -> its settings model (the recipe schema and the README's key table are derived from these)
PLUGIN_SETTINGS_MODELS: dict[str, type[PluginSettings]] = {}
# pruning_type -> the config keys its settings model declares beyond INC's own
TYPE_CONFIG_KEYS: dict[str, frozenset[str]] = {}
# every plugin type's own config keys (INC would drop them from global settings)
PLUGIN_CONFIG_KEYS: set[str] = set()


def register_one_shot_pruning(pruning_type: str, *, settings: type[PluginSettings], needs_data: bool = True,
                              default_pattern: str = INC_DEFAULT_PATTERN, inc_builtin: bool = False):
    """Class decorator: route configs with this `pruning_type` to the class, registered in INC's PRUNINGS as
    "<pruning_type>_pruning"; its `pruner_class` (if it has one) becomes INC's PRUNERS["pt_<pruning_type>"].

    `settings`: the type's settings model; its fields that INC does not know are the type's own config keys (any
    other key besides INC's is refused). The class gets `pruning_type`, `settings_model`, `needs_data` and
    `inc_registry_name` as class attributes. `needs_data=False` lets callers omit the dataloader (it is then None).

    `inc_builtin=True`: INC 3.7.1 has a one-shot type of this name (e.g. "sparse_gpt"), which keeps running every
    entry that sets none of the settings' own keys (`runs_as_plugin`); the class and its pruner are registered in
    INC's registries as "plugin_<pruning_type>" so INC's own stay where they are.
    """
    _check_type(pruning_type, settings, inc_builtin)

    def register(cls):
        registry_name = f"plugin_{pruning_type}" if inc_builtin else pruning_type
        register_pruning(f"{registry_name}_pruning")(cls)
        pruner_class = getattr(cls, "pruner_class", None)
        if pruner_class is not None:
            register_pruner(f"pt_{registry_name}")(pruner_class)
        cls.pruning_type, cls.settings_model, cls.needs_data = pruning_type, settings, needs_data
        cls.inc_registry_name = registry_name
        ONE_SHOT_TYPES[pruning_type] = OneShotType(cls, settings, needs_data, default_pattern, inc_builtin)
        _register_settings(pruning_type, settings)
        return cls

    return register


def _check_type(pruning_type: str, settings: type[PluginSettings], inc_builtin: bool = False) -> None:
    clashes = [s for s in RESERVED_SUBSTRINGS if s in pruning_type]
    if clashes and not inc_builtin:
        raise ValueError(f"pruning type {pruning_type!r} contains {clashes}, which INC's dispatch reserves")
    if not (isinstance(settings, type) and issubclass(settings, PluginSettings)):
        raise TypeError(f"settings of {pruning_type!r} must be a PluginSettings subclass, got {settings!r}")


def _register_settings(pruning_type: str, settings: type[PluginSettings]) -> None:
    """The type's settings model, and its own config keys: its fields that INC does not know."""
    PLUGIN_SETTINGS_MODELS[pruning_type] = settings
    own = frozenset(settings.model_fields) - INC_CONFIG_KEYS
    TYPE_CONFIG_KEYS[pruning_type] = own
    PLUGIN_CONFIG_KEYS.update(own)


# training-aware plugin types (pruned by INC's own training-aware flow, with the plugin's pruner) -> default pattern
TRAINING_AWARE_TYPES: dict[str, str] = {}


def register_training_aware_pruning(pruning_type: str, *, settings: type[PluginSettings],
                                    default_pattern: str = INC_DEFAULT_PATTERN):
    """Class decorator for an INC pruner class (a ``PytorchBasePruner``): INC's PRUNERS["pt_<pruning_type>"], so
    INC's training-aware flow (``prepare_pruning(model, config, optimizer=...)`` and its step callbacks) builds it
    for entries of this type. `settings`: the type's settings model, whose keys beyond INC's are its own (checked
    like a one-shot type's)."""
    _check_type(pruning_type, settings)

    def register(cls):
        register_pruner(f"pt_{pruning_type}")(cls)
        TRAINING_AWARE_TYPES[pruning_type] = default_pattern
        _register_settings(pruning_type, settings)
        return cls

    return register


def runs_as_plugin(settings: Mapping[str, Any], plugins_only: bool = False) -> bool:
    """Whether a config entry (its resolved settings) runs a plugin pruning class rather than INC's own flows: every
    entry of a plugin type, and an entry of an INC built-in type the plugins also implement when it sets one of the
    plugin's own keys or when ``plugins_only`` (a streamed model, or calibration across processes)."""
    registered = ONE_SHOT_TYPES.get(settings["pruning_type"])
    if registered is None:
        return False
    own = TYPE_CONFIG_KEYS[settings["pruning_type"]]
    return not registered.inc_builtin or plugins_only or any(settings.get(key) is not None for key in own)


def streaming_types() -> list[str]:
    """The one-shot types that prune a streamed model (their pruning class walks it block by block)."""
    return sorted(name for name, registered in ONE_SHOT_TYPES.items() if registered.pruning_class.streams)


def structured_types() -> list[str]:
    """The one-shot types that remove whole attention units and FFN neurons (their results slim)."""
    return sorted(name for name, registered in ONE_SHOT_TYPES.items()
                  if getattr(registered.pruning_class, "prunes_structures", False))


def distributed_types() -> list[str]:
    """The one-shot types whose statistics are combined across torch.distributed ranks."""
    return sorted(name for name, registered in ONE_SHOT_TYPES.items()
                  if registered.pruning_class.combines_across_ranks)


def one_shot_pruning_class(pruning_type: str) -> type:
    return ONE_SHOT_TYPES[pruning_type].pruning_class


def plugin_settings_model(pruning_type: str) -> type[PluginSettings] | None:
    """The settings model of a plugin pruning type; None for INC's own types."""
    return PLUGIN_SETTINGS_MODELS.get(pruning_type)


def needs_data(pruning_type: str) -> bool:
    """Whether a plugin one-shot type prunes from calibration data (so `dataloader=` is required)."""
    return ONE_SHOT_TYPES[pruning_type].needs_data


def default_pattern(pruning_type: str) -> str:
    """The pattern a config entry of this type gets when it sets none: the plugin's own, else INC's "4x1"."""
    registered = ONE_SHOT_TYPES.get(pruning_type)
    if registered is not None:
        return registered.default_pattern
    return TRAINING_AWARE_TYPES.get(pruning_type, INC_DEFAULT_PATTERN)


def plugin_keys_read_by(pruning_type: str) -> frozenset[str]:
    """The plugin config keys a pruning type may read: a one-shot type its own; an INC type any plugin's, since
    INC's training-aware pruners host the plugins' criteria (wanda_score, apoz, ...)."""
    return TYPE_CONFIG_KEYS.get(pruning_type, frozenset(PLUGIN_CONFIG_KEYS))


def is_one_shot(pruning_type: str) -> bool:
    """True for types that prune at once from a dataloader; False for INC's training-aware types."""
    return pruning_type in ONE_SHOT_TYPES or "gpt" in pruning_type or "retrain" in pruning_type
