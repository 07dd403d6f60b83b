"""Latency-constrained mask search from a measured lookup table (Kwon et al. 2022, section 4.1, "latency").

A latency table describes ONE block of the model on one machine (``inc_plugins.latency_table`` measures, saves
and loads them): ``head_latency`` [n_heads + 1] seconds of a block with 0..n_heads heads kept (and no FFN neurons;
its fixed cost included) and ``neuron_latency`` [n_neurons + 1] seconds that 0..n_neurons FFN neurons add, plus
``machine`` (``current_machine()`` where it was measured) and optionally ``model`` (the architecture). Under
grouped-query attention the search unit is a key/value group, so a table with n_heads + 1 entries is read at
multiples of the group size (a table with n_kv_heads + 1 entries is taken as per group already).
The model's latency is the sum over blocks of ``head_latency[kept] + neuron_latency[kept]``, and
``target_sparsity`` is the fraction of the dense latency to remove:
budget = ``(1 - target_sparsity) * n_layers * (head_latency[-1] + neuron_latency[-1])``.

A table measured elsewhere says little about this machine. Policy (the same as
``inc_plugins.latency_table.check_same_machine``): a different CPU model, CPU features, backend or thread count
REFUSES the table (``LatencyTableMismatchError``) unless ``allow_foreign=True``, which downgrades it to a warning;
a different torch version only warns. Metadata that the table lacks cannot be compared: a warning names it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inc_plugins.algorithms.mask_search import search_masks_under_latency
from inc_plugins.models.structure_masks import MaskStructure

__all__ = [
    "LatencyTable",
    "LatencyTableMismatchError",
    "current_machine",
    "as_latency_table",
    "check_machine",
    "unit_latency_table",
    "latency_budget",
    "search_masks_under_latency_table",
]

# Keys that refuse a table when they differ / only warn, each with the other names a table's metadata may use.
_REFUSING_KEYS = {
    "cpu_model": ("cpu_model", "cpu", "processor"),
    "cpu_flags": ("cpu_flags",),
    "backend": ("backend",),
    "num_threads": ("num_threads", "threads", "torch_threads"),
}
_WARNING_KEYS = {"torch_version": ("torch_version", "torch")}
# Architecture facts a table's ``model`` metadata may record, and the MaskStructure field each must equal.
_MODEL_FACTS = {"hidden_size": "hidden_size", "num_heads": "n_heads", "num_kv_heads": "n_kv_heads",
                "head_dim": "head_dim", "intermediate_size": "n_neurons"}


class LatencyTableMismatchError(ValueError):
    """The latency table was measured on another machine, torch version, thread count or backend."""


@dataclass(frozen=True)
class LatencyTable:
    """Per-block latencies in seconds: ``head_latency`` [n_head_units + 1 or n_heads + 1], ``neuron_latency``
    [n_neurons + 1]; ``machine``: where they were measured; ``model``: the architecture, when recorded."""

    head_latency: torch.Tensor
    neuron_latency: torch.Tensor
    machine: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)


def current_machine(backend: str = "eager") -> dict[str, Any]:
    """What a latency measurement depends on here, as ``inc_plugins.latency_table`` records it with every table:
    CPU model name (``/proc/cpuinfo``) and features, torch version, torch's thread count, and ``backend``."""
    from inc_plugins.latency_table import current_machine as machine_of_this_process

    return machine_of_this_process(backend)


def _load_from_path(path: Path):
    try:
        from inc_plugins.latency_table import load_latency_table
    except ImportError as error:  # pragma: no cover - depends on the optional module being present
        raise ImportError(
            f"cannot load latency table {str(path)!r}: inc_plugins.latency_table.load_latency_table is not available "
            f"({error}); pass a table object with head_latency, neuron_latency and machine instead"
        ) from error
    if not path.exists():
        raise FileNotFoundError(f"latency table {str(path)!r} does not exist")
    return load_latency_table(path)


def as_latency_table(source: Any) -> LatencyTable:
    """A ``LatencyTable`` from a path (loaded with ``inc_plugins.latency_table.load_latency_table``), a mapping
    with keys ``head_latency``/``neuron_latency``/``machine``, or any object with those attributes."""
    if isinstance(source, LatencyTable):
        return source
    if isinstance(source, (str, Path)):
        source = _load_from_path(Path(source))
    get = source.get if isinstance(source, Mapping) else lambda key, default=None: getattr(source, key, default)
    head, neuron = get("head_latency"), get("neuron_latency")
    if head is None or neuron is None:
        raise ValueError(
            f"a latency table needs head_latency and neuron_latency (seconds for 0..n kept units of one block), "
            f"got a {type(source).__name__} without them"
        )
    machine, model = get("machine", None) or {}, get("model", None) or {}
    if not isinstance(machine, Mapping) or not isinstance(model, Mapping):
        raise ValueError(
            f"a latency table's machine and model metadata must be dicts, got {type(machine).__name__} and "
            f"{type(model).__name__}"
        )
    return LatencyTable(
        torch.as_tensor(head, dtype=torch.float64).flatten(),
        torch.as_tensor(neuron, dtype=torch.float64).flatten(),
        dict(machine),
        dict(model),
    )


def _lookup(machine: Mapping[str, Any], aliases: tuple[str, ...]) -> Any:
    for alias in aliases:
        if alias in machine:
            return machine[alias]
    return None


def check_machine(table: LatencyTable, current: Mapping[str, Any], allow_foreign: bool = False) -> None:
    """Refuse (``LatencyTableMismatchError``) a table whose CPU model, CPU features, backend or thread count differ
    from ``current``; with ``allow_foreign`` only warn. Warn about another torch version and missing metadata."""
    differences, missing = [], []
    for key, aliases in _REFUSING_KEYS.items():
        measured, here = _lookup(table.machine, aliases), _lookup(current, aliases)
        if measured is None:
            if here is not None:
                missing.append(key)
        elif measured != here:
            differences.append(f"{key}: table {measured!r}, here {here!r}")
    if missing:
        warnings.warn(
            f"the latency table does not record {missing}: cannot check that it was measured on this machine",
            stacklevel=2,
        )
    for key, aliases in _WARNING_KEYS.items():
        measured, here = _lookup(table.machine, aliases), _lookup(current, aliases)
        if measured is not None and measured != here:
            warnings.warn(f"the latency table was measured with {key} {measured!r}, running {here!r}", stacklevel=2)
    if differences:
        message = "the latency table was measured elsewhere (" + "; ".join(differences) + ")"
        if not allow_foreign:
            raise LatencyTableMismatchError(
                message + ": its latencies do not describe this machine. Measure a table here with "
                "`python -m inc_plugins.latency_table measure`, or set allow_foreign_latency_table=True to use it anyway"
            )
        warnings.warn(message + "; using it because allow_foreign_latency_table=True", stacklevel=2)


def unit_latency_table(structure: MaskStructure, table: LatencyTable) -> LatencyTable:
    """``table`` with ``head_latency`` per search unit ([n_head_units + 1]): under grouped-query attention a table
    per query head ([n_heads + 1]) is read at multiples of the group size. Raises ValueError when the table's sizes
    or recorded architecture do not match the model."""
    for fact, attribute in _MODEL_FACTS.items():
        recorded = table.model.get(fact)
        if recorded is not None and recorded != getattr(structure, attribute):
            raise ValueError(
                f"the latency table was measured for {fact}={recorded!r}, this model has {getattr(structure, attribute)!r}"
            )
    n_units, n_neurons = structure.n_head_units, structure.n_neurons
    head = table.head_latency
    if structure.grouped and head.numel() == structure.n_heads + 1:
        head = head[:: structure.heads_per_unit]
    unit_name = "key/value groups" if structure.grouped else "heads"
    if head.numel() != n_units + 1 or table.neuron_latency.numel() != n_neurons + 1:
        raise ValueError(
            f"the latency table has {table.head_latency.numel()} head entries and {table.neuron_latency.numel()} "
            f"neuron entries; this model needs {n_units + 1} (0..{n_units} {unit_name})"
            + (f" or {structure.n_heads + 1} (per query head)" if structure.grouped else "")
            + f" and {n_neurons + 1}"
        )
    return LatencyTable(head, table.neuron_latency, table.machine, table.model)


def latency_budget(structure: MaskStructure, table: LatencyTable, target_sparsity: float) -> tuple[float, float]:
    """(budget, dense) seconds per forward pass of the blocks, for a ``unit_latency_table``. Raises ValueError
    when even pruning everything cannot reach the target (the table's entries at 0 units)."""
    table = unit_latency_table(structure, table)
    if isinstance(target_sparsity, bool) or not 0 <= float(target_sparsity) < 1:
        raise ValueError(f"target_sparsity (fraction of latency to remove) must be in [0, 1), got {target_sparsity!r}")
    layers = structure.n_layers
    dense = layers * float(table.head_latency[-1] + table.neuron_latency[-1])
    floor = layers * float(table.head_latency[0] + table.neuron_latency[0])
    budget = (1.0 - float(target_sparsity)) * dense
    if dense <= 0:
        raise ValueError("the latency table's dense latency is 0 seconds: it holds no measurements")
    if budget < floor:
        raise ValueError(
            f"target_sparsity={target_sparsity} cannot be met under this latency table: removing every head and "
            f"neuron still costs {floor:.3g} s ({floor / dense:.1%} of the dense {dense:.3g} s), so at most "
            f"{1 - floor / dense:.3f} of the latency can be removed"
        )
    return budget, dense


def search_masks_under_latency_table(
    head_importance: torch.Tensor, neuron_importance: torch.Tensor, budget: float, table: LatencyTable
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool (unit_head_mask, neuron_mask) fitting ``budget`` seconds (``search_masks_under_latency``); ``table``
    from ``unit_latency_table``."""
    return search_masks_under_latency(
        head_importance, neuron_importance, budget, table.head_latency, table.neuron_latency
    )
