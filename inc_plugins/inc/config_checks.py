"""Clear errors for pruning settings, raised before INC's bare assertions can fire."""

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from neural_compressor.compression.pruner.criteria import CRITERIA

from inc_plugins.plugin_settings import PruningConfigError

from . import one_shot
from .one_shot import INC_CONFIG_KEYS, default_pattern, plugin_settings_model

__all__ = ["ALLOWED_PATTERNS", "INC_CONFIG_KEYS", "PruningConfigError", "check_pruner_settings", "default_pattern",
           "known_pruning_types", "pattern_name", "require_pattern"]

# INC reads patterns loosely: it drops everything up to the last "_", runs any string with "x" as NxM (so
# "4x1x2" is 4x1), and "0x4" / "1x0" pass its checks and divide by zero later. Only what its pattern classes
# (patterns/nxm.py, ninm.py, mha.py) really implement is accepted here, spelled one way (no leading zeros).
# INC 3.7.1 itself has no prefixed form (INC 1.x's "tile_pattern_4x1" is gone).
_COUNT = r"[1-9][0-9]*"
_NXM = re.compile(rf"^(?:{_COUNT}|channel)x{_COUNT}$|^{_COUNT}x(?:{_COUNT}|channel)$")  # not channelxchannel
_NM = re.compile(rf"^({_COUNT}):({_COUNT})$")
ALLOWED_PATTERNS = (
    "'NxM' with whole numbers N, M >= 1 (e.g. '1x1', '4x1'), 'channelxM' or 'Nxchannel' (e.g. 'channelx1', "
    "'1xchannel'), 'N:M' with 0 < N < M (N of every M weights pruned, e.g. '2:4') or 'mha' (attention heads)"
)


def known_pruning_types() -> list[str]:
    """Every pruning type reachable through `inc_plugins.prepare_pruning`: INC's and the plugins'."""
    inc_types = {"pattern_lock", "sparse_gpt"}
    for criterion in CRITERIA:
        inc_types |= {criterion, f"{criterion}_progressive"}
    return sorted(inc_types | set(one_shot.ONE_SHOT_TYPES) | set(one_shot.TRAINING_AWARE_TYPES))


def pattern_name(pattern: Any) -> str:
    """A pattern as INC's pattern classes read it: what follows the last "_"."""
    return str(pattern).split("_")[-1]


def require_pattern(pattern: Any, pruning_type: str, allowed: str, why: str) -> str:
    """`pattern` if INC reads it as `allowed`, else PruningConfigError saying why `pruning_type` needs it."""
    if pattern_name(pattern) != allowed:
        raise PruningConfigError(f"pruning_type {pruning_type!r} {why}: set pattern {allowed!r} (got {pattern!r})")
    return pattern


def _nearest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _is_pattern(name: str) -> bool:
    return name == "mha" or _NXM.match(name) is not None or _NM.match(name) is not None


def _check_pattern(pattern: Any, pruning_type: str, sparsity: float) -> None:
    if not isinstance(pattern, str) or not _is_pattern(pattern):
        suffix = pattern.split("_")[-1] if isinstance(pattern, str) else ""
        hint = f" Did you mean {suffix!r}?" if "_" in str(pattern) and _is_pattern(suffix) else ""
        raise PruningConfigError(f"pattern {pattern!r} is not understood: use {ALLOWED_PATTERNS}.{hint}")
    nm = _NM.match(pattern)
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        if not n < m:
            raise PruningConfigError(f"pattern {pattern!r}: N:M prunes N of every M weights, so it needs 0 < N < M")
        # pattern_lock only keeps existing zeros, so INC does not bound its target (utils.check_config)
        if pruning_type != "pattern_lock" and sparsity > n / m + 1e-9:
            raise PruningConfigError(
                f"target_sparsity {sparsity} is above what pattern {pattern!r} can reach ({n}/{m})"
            )


def _check_keys(settings: Mapping[str, Any], pruning_type: str) -> None:
    """A one-shot plugin type refuses keys it does not read: INC would only log and prune without them."""
    own = one_shot.TYPE_CONFIG_KEYS.get(pruning_type)
    if own is None:  # INC's types: INC warns itself, and its pruners host plugin criteria with their own keys
        return
    unknown = sorted(set(settings) - INC_CONFIG_KEYS - own)
    if unknown:
        key = unknown[0]
        raise PruningConfigError(
            f"pruning_type {pruning_type!r} has no config key {key!r}.{_nearest(key, own | INC_CONFIG_KEYS)} "
            f"Its own keys: {', '.join(sorted(own)) or 'none'}; INC's keys: {', '.join(sorted(INC_CONFIG_KEYS))}"
        )


def check_pruner_settings(settings: Mapping[str, Any]) -> None:
    """Raise PruningConfigError naming the bad key, the given value and what is allowed.

    `settings` is one pruner's resolved settings; with no "pattern" (or None) the pruning type's default applies.
    A type with a settings model (the plugins' types, and "sparse_gpt", which INC's driver may run) has its values
    checked by it too.
    """
    pruning_type = settings.get("pruning_type")
    allowed = known_pruning_types()
    if pruning_type not in allowed:
        raise PruningConfigError(
            f"unknown pruning_type {pruning_type!r}.{_nearest(str(pruning_type), allowed)} Allowed: {', '.join(allowed)}"
        )
    sparsity = settings.get("target_sparsity")
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 <= sparsity < 1:
        raise PruningConfigError(f"target_sparsity must be a number in [0, 1), got {sparsity!r}")
    pattern = settings.get("pattern")
    _check_pattern(default_pattern(pruning_type) if pattern is None else pattern, pruning_type, sparsity)
    _check_keys(settings, pruning_type)
    settings_model = plugin_settings_model(pruning_type)
    if settings_model is not None:
        settings_model.from_config(settings)
