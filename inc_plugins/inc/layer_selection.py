"""Which layers a pruning config entry selects: INC's `op_names` semantics, with the task heads kept dense.

INC's `parse_to_prune` appends the auto-detected classifier head to the caller's `excluded_op_names` list and
uses it as an unescaped regex; here heads are compared by exact name and nothing is written into the config.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from inc_plugins.models.architectures import UnsupportedModelError, adapter_for

from .config_checks import PruningConfigError

EXAMPLE_NAMES = 6  # how many layer names an error message shows


def as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def task_head_names(model: nn.Module) -> list[str]:
    """Task heads to keep dense: the model family's (``lm_head``, ``classifier``, ...); for models no adapter
    knows, the last Linear, as INC does."""
    try:
        return adapter_for(model).head_names(model)
    except UnsupportedModelError:
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        return linears[-1:]


def compiled(patterns: Sequence[str], key: str) -> list[re.Pattern]:
    result = []
    for pattern in patterns:
        try:
            result.append(re.compile(pattern))
        except re.error as error:
            raise PruningConfigError(f"{key} entry {pattern!r} is not a valid regular expression: {error}") from error
    return result


def select_layers(info: Mapping[str, Any], model: nn.Module, head_names: Sequence[str]) -> dict[str, nn.Module]:
    """{name: module} that a config entry selects, as INC's ``parse_to_prune`` would, minus the task heads.

    A module is a candidate when one of ``pruning_op_types`` is a substring of its class name and it has a
    ``weight``; ``op_names`` (default: every candidate) and ``excluded_op_names`` are regexes searched in the
    name. Modules named in ``head_names``, and their submodules, are excluded by exact name.
    Raises PruningConfigError when an ``op_names`` entry matches no candidate, or when nothing is left.
    """
    op_types = as_list(info.get("pruning_op_types")) or ["Conv", "Linear"]
    candidates = {
        name: module
        for name, module in model.named_modules()
        if getattr(module, "weight", None) is not None and any(op_type in type(module).__name__ for op_type in op_types)
    }
    op_names = as_list(info.get("op_names")) or [".*"]
    selected: dict[str, nn.Module] = {}
    unmatched = []
    for raw, pattern in zip(op_names, compiled(op_names, "op_names")):
        matched = {name: module for name, module in candidates.items() if pattern.search(name)}
        if not matched:
            unmatched.append(raw)
        selected.update(matched)
    if unmatched:
        examples = ", ".join(repr(name) for name in list(candidates)[:EXAMPLE_NAMES]) or "none"
        raise PruningConfigError(
            f"op_names {unmatched} match no {'/'.join(op_types)} layer of {type(model).__name__}; "
            f"layer names look like: {examples}"
        )

    excluded = compiled(as_list(info.get("excluded_op_names")), "excluded_op_names")
    heads = tuple(head_names)

    def is_head(name: str) -> bool:
        return any(name == head or name.startswith(head + ".") for head in heads)

    kept = {
        name: module
        for name, module in selected.items()
        if not is_head(name) and not any(pattern.search(name) for pattern in excluded)
    }
    if not kept:
        raise PruningConfigError(
            f"every layer matched by op_names {op_names} ({', '.join(map(repr, list(selected)[:EXAMPLE_NAMES]))}) "
            f"is excluded by excluded_op_names {as_list(info.get('excluded_op_names'))} or is a task head {list(heads)}"
        )
    return kept
