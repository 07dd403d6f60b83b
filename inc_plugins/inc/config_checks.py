"""Clear errors for pruning settings, raised before INC's bare assertions can fire."""

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from neural_compressor.compression.pruner.criteria import CRITERIA

from .one_shot import ONE_SHOT_PRUNINGS

_PATTERN_FORMS = (
    re.compile(r"^(\d+|channel)x(\d+|channel)$"),  # NxM blocks, channelx1, 1xchannel
    re.compile(r"^\d+:\d+$"),  # N:M, N of every M pruned
    re.compile(r"^.*mha.*$"),  # attention heads (INC's own MHA pruner)
)


class PruningConfigError(ValueError):
    """A pruning setting that no pruner can run."""


def known_pruning_types() -> list[str]:
    """Every pruning type reachable through `inc_plugins.prepare_pruning`: INC's and the plugins'."""
    inc_types = {"pattern_lock", "sparse_gpt"}
    for criterion in CRITERIA:
        inc_types |= {criterion, f"{criterion}_progressive"}
    return sorted(inc_types | set(ONE_SHOT_PRUNINGS))


def _nearest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_pruner_settings(settings: Mapping[str, Any]) -> None:
    """Raise PruningConfigError naming the bad key, the given value and what is allowed."""
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
    if not isinstance(pattern, str) or not any(form.match(pattern.split("_")[-1]) for form in _PATTERN_FORMS):
        raise PruningConfigError(
            f"pattern {pattern!r} is not understood: use 'NxM' (e.g. '1x1', '4x1', 'channelx1'), "
            f"'N:M' (N of every M weights pruned, e.g. '2:4') or 'mha' (attention heads)"
        )
    if ":" in pattern:
        n, m = (int(v) for v in pattern.split("_")[-1].split(":"))
        if not 0 < n < m:
            raise PruningConfigError(f"pattern {pattern!r}: N:M prunes N of every M weights, so it needs 0 < N < M")
        if sparsity > n / m + 1e-9:
            raise PruningConfigError(f"target_sparsity {sparsity} is above what pattern {pattern!r} can reach ({n}/{m})")
