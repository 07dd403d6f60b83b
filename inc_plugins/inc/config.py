"""Builds INC `WeightPruningConfig` objects without INC's shared-default bug.

INC 3.7.1's `WeightPruningConfig.__init__` uses mutable defaults (`pruning_configs=[{}]`, `op_names=[]`, ...),
and `process_config` / `parse_to_prune` write resolved settings into them. A second config created with
defaults then silently inherits the first one's pruning type, sparsity and excluded layers.

Two defences: `private_copy` rebuilds a config from the caller's values, reading an attribute that *is* one of
INC's default objects as "not passed" (so whatever INC wrote into it is dropped); and `restore_inc_defaults`
gives `WeightPruningConfig.__init__` fresh, pristine default objects whenever the current ones were written into.
"""

import contextlib
import copy
from collections.abc import Mapping, Sequence
from typing import Any

from neural_compressor import WeightPruningConfig

from .config_checks import PruningConfigError

# INC's documented defaults for the mutable arguments of WeightPruningConfig.__init__; copied on every use
_PRISTINE: dict[str, Any] = {
    "pruning_configs": [{}],
    "op_names": [],
    "excluded_op_names": [],
    "pruning_op_types": ["Conv", "Linear"],
}

# id -> (argument name, object) for every default object WeightPruningConfig has used in this process, the
# originals and the replacements: configs built earlier keep pointing at old ones. The objects are kept alive
# so that their ids are never reused by other objects.
_INC_DEFAULT_OBJECTS: dict[int, tuple[str, Any]] = {}


def _default_arguments() -> dict[str, Any]:
    """Argument name -> the object WeightPruningConfig.__init__ currently uses as that argument's default."""
    init = WeightPruningConfig.__init__
    names = init.__code__.co_varnames[: init.__code__.co_argcount]
    defaults = init.__defaults__ or ()
    return {**dict(zip(names[len(names) - len(defaults):], defaults)), **(init.__kwdefaults__ or {})}


def _remember_inc_defaults() -> None:
    for name, value in _default_arguments().items():
        if not isinstance(value, (list, dict)):
            continue
        # the inner dict of pruning_configs=[{}] is the one INC fills in, so it counts as a default object too
        inner = [v for v in value if isinstance(v, (list, dict))] if isinstance(value, list) else []
        for obj in [value, *inner]:
            _INC_DEFAULT_OBJECTS[id(obj)] = (name, obj)


_remember_inc_defaults()


def _default_argument_of(value: Any) -> str | None:
    """The argument name if `value` is (identity) one of INC's default objects, else None."""
    found = _INC_DEFAULT_OBJECTS.get(id(value))
    return found[0] if found is not None and found[1] is value else None


def restore_inc_defaults() -> None:
    """Give WeightPruningConfig.__init__ fresh pristine defaults if INC wrote into the current ones.

    The written-into objects are replaced, never emptied in place: configs and INC pruners alive now may still
    hold them, and clearing them would change those objects behind their owners' backs."""
    current = _default_arguments()
    if all(current[name] == value for name, value in _PRISTINE.items() if name in current):
        return
    init = WeightPruningConfig.__init__
    names = init.__code__.co_varnames[: init.__code__.co_argcount]
    fresh = {name: copy.deepcopy(value) for name, value in _PRISTINE.items()}
    positional = names[len(names) - len(init.__defaults__ or ()):]
    init.__defaults__ = tuple(fresh.get(name, current[name]) for name in positional)
    if init.__kwdefaults__:
        init.__kwdefaults__ = {name: fresh.get(name, value) for name, value in init.__kwdefaults__.items()}
    _remember_inc_defaults()


@contextlib.contextmanager
def inc_defaults_restored():
    """Around any INC call: INC's later calls, ours or the user's, start from pristine defaults again."""
    try:
        yield
    finally:
        restore_inc_defaults()


def _polluted(where: str, name: str) -> PruningConfigError:
    return PruningConfigError(
        f"{where} is INC's shared default for {name!r}, already filled in by an earlier INC call, so what was "
        f"asked for cannot be told apart: build the config with fresh lists, e.g. inc_plugins.pruning_config(...)"
    )


def _own_value(where: str, value: Any) -> Any:
    """A deep copy of a value the caller set; refuse INC default objects (and ones nested in lists or dicts)."""
    name = _default_argument_of(value)
    if name is not None:
        raise _polluted(where, name)
    if isinstance(value, Mapping):
        return {k: _own_value(f"{where}[{k!r}]", v) for k, v in value.items()}
    if isinstance(value, list):
        return [_own_value(where, v) for v in value]
    return copy.deepcopy(value)


def private_copy(config: WeightPruningConfig) -> WeightPruningConfig:
    """A new config rebuilt from a private copy of the caller's values, never sharing INC's default objects.

    A global attribute that IS INC's default object for that argument was not passed by the caller: it gets the
    pristine default, whatever INC has since written into it. A default object found anywhere else (inside a
    pruning_configs entry, or under another argument) means INC's resolved settings were mixed into the caller's
    own: PruningConfigError, since they cannot be separated from what the caller asked for.
    """
    if _default_argument_of(config.pruning_configs) == "pruning_configs":
        entries = copy.deepcopy(_PRISTINE["pruning_configs"])
    else:
        entries = [_own_value(f"pruning_configs entry {i}", entry)
                   for i, entry in enumerate(config.pruning_configs or [{}])]
    settings = {}
    for key, value in config.weight_compression.items():
        if _default_argument_of(value) == key:
            settings[key] = copy.deepcopy(_PRISTINE[key])
        else:
            settings[key] = _own_value(f"global setting {key!r}", value)
    return WeightPruningConfig(pruning_configs=entries or [{}], backend=config.backend, **settings)


def pruning_config(pruning_configs: Sequence[Mapping[str, Any]] | None = None,
                   **global_settings: Any) -> WeightPruningConfig:
    """A `WeightPruningConfig` whose every list and dict is a fresh copy owned by this config alone.

    Accepts exactly the arguments of `WeightPruningConfig`. Settings in `pruning_configs` entries override the
    global ones for the layers they select, as in INC.
    """
    defaults = {name: value for name, value in _PRISTINE.items() if name != "pruning_configs"}
    settings = copy.deepcopy({**defaults, **global_settings})
    local = [dict(copy.deepcopy(entry)) for entry in (pruning_configs or [{}])]
    return WeightPruningConfig(pruning_configs=local, **settings)
