"""Latency-constrained mask search from a measured lookup table (Kwon et al. 2022, section 4.1, "latency").

A latency table (``inc_plugins.perf.latency_table.LatencyTable``; ``python -m inc_plugins.latency_table`` measures,
saves and shows them) describes ONE block of the model on one machine: ``head_latency`` [n_heads + 1] seconds of a
block with 0..n_heads heads kept (and no FFN neurons; its fixed cost included) and ``neuron_latency``
[n_neurons + 1] seconds that 0..n_neurons FFN neurons add, plus ``machine`` (``current_machine()`` where it was
measured) and optionally ``model`` (the architecture). Under grouped-query attention the search unit is a
key/value group, so a table with n_heads + 1 entries is read at multiples of the group size (a table with
n_kv_heads + 1 entries is taken as per group already).
The model's latency is the sum over blocks of ``head_latency[kept] + neuron_latency[kept]``, and
``target_sparsity`` is the fraction of the dense latency to remove:
budget = ``(1 - target_sparsity) * n_layers * (head_latency[-1] + neuron_latency[-1])``.

A table measured elsewhere says little about this machine: ``check_machine`` (``inc_plugins.perf.latency_table``)
REFUSES a table from another CPU model, CPU flags, backend or thread count (``LatencyTableMismatchError``) unless
``allow_foreign=True``, which downgrades it to a warning; a different torch version only warns. Metadata that the
table lacks cannot be compared: a warning names it.
"""

from __future__ import annotations

import dataclasses

import torch

from inc_plugins.algorithms.neuron_blocks import search_blocks_under_latency
from inc_plugins.models.structure_masks import MaskStructure
from inc_plugins.perf.latency_table import (
    LatencyTable,
    LatencyTableMismatchError,
    as_latency_table,
    check_machine,
    current_machine,
)

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

# Architecture facts a table's ``model`` metadata may record, and the MaskStructure field each must equal.
_MODEL_FACTS = {"hidden_size": "hidden_size", "num_heads": "n_heads", "num_kv_heads": "n_kv_heads",
                "head_dim": "head_dim", "intermediate_size": "n_neurons"}


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
    if structure.grouped and len(head) == structure.n_heads + 1:
        head = head[:: structure.heads_per_unit]
    unit_name = "key/value groups" if structure.grouped else "heads"
    if len(head) != n_units + 1 or len(table.neuron_latency) != n_neurons + 1:
        raise ValueError(
            f"the latency table has {len(table.head_latency)} head entries and {len(table.neuron_latency)} "
            f"neuron entries; this model needs {n_units + 1} (0..{n_units} {unit_name})"
            + (f" or {structure.n_heads + 1} (per query head)" if structure.grouped else "")
            + f" and {n_neurons + 1}"
        )
    return dataclasses.replace(table, head_latency=head)


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
    head_importance: torch.Tensor, neuron_importance: torch.Tensor, budget: float, table: LatencyTable,
    width_multiple: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool (unit_head_mask, neuron_mask) fitting ``budget`` seconds (``search_masks_under_latency``), every block
    keeping a multiple of ``width_multiple`` FFN neurons (``neuron_blocks``); ``table`` from ``unit_latency_table``."""
    return search_blocks_under_latency(
        head_importance, neuron_importance, budget,
        torch.tensor(table.head_latency, dtype=torch.float64), torch.tensor(table.neuron_latency, dtype=torch.float64),
        width_multiple,
    )
