"""FLOPs (MAC) cost of heads and FFN neurons, and the FLOPs-constrained mask search.

``target_sparsity`` of ``mask_search`` is the FRACTION OF FLOPs REMOVED from the prunable parts: the attention
units and FFN neurons of every block. Embeddings, layer norms, biases, softmax and task heads (classifier, pooler,
LM head) are not counted, as in Kwon et al. (2022), because pruning heads and neurons does not change them.
The budget is ``(1 - target_sparsity) * dense MACs`` per sequence of ``seq_len`` tokens (by default the average
non-padding length of the calibration batches).

Costs per sequence of L tokens, hidden size d, head size d_h (MACs; FLOPs are about 2x):

* bert-like head: ``4*L*d*d_h + 2*L^2*d_h`` (Q, K, V, output projection, scores, weighted sum) and neuron
  ``2*L*d`` (``inc_plugins.algorithms.mac_cost``, the paper's model).
* llama-like key/value group of g query heads: ``(2g + 2)*L*d*d_h + 2g*L^2*d_h`` (g query heads, one key and one
  value head, g output slices; scores for the full L x L matrix as eager attention computes them) and neuron
  ``3*L*d`` (gate, up and down projections).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from inc_plugins.algorithms.mac_cost import head_macs, model_macs, neuron_macs
from inc_plugins.algorithms.neuron_blocks import search_blocks_under_unit_costs
from inc_plugins.models.structure_masks import MaskStructure

__all__ = ["SEQ_LEN_DESCRIPTION", "SeqLenSetting", "UnitCosts", "unit_costs", "masked_macs", "flops_budget",
           "search_masks_under_flops"]

# the ``seq_len`` key of every type whose target counts FLOPs (mask_search and the structured types): one declaration,
# so the recipe schema sees one key
SeqLenSetting = Annotated[int, Field(ge=1, le=8192)] | None
SEQ_LEN_DESCRIPTION = ("tokens per sequence the FLOPs are counted at; null: the average non-padding length of the "
                       "calibration samples")


@dataclass(frozen=True)
class UnitCosts:
    """MACs per sequence of one attention unit and of one FFN neuron, and of the dense prunable parts."""

    seq_len: int
    per_head_unit: int
    per_neuron: int
    dense: int


def unit_costs(structure: MaskStructure, seq_len: int) -> UnitCosts:
    """MAC costs of ``structure``'s units for sequences of ``seq_len`` tokens."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int (tokens per sequence), got {seq_len!r}")
    d, dh = structure.hidden_size, structure.head_dim
    if structure.family == "llama-like":
        g = structure.heads_per_unit
        per_head = (2 * g + 2) * seq_len * d * dh + 2 * g * seq_len * seq_len * dh
        per_neuron = 3 * seq_len * d
    else:
        per_head, per_neuron = head_macs(seq_len, d, dh), neuron_macs(seq_len, d)
    dense = structure.n_layers * (structure.n_head_units * per_head + structure.n_neurons * per_neuron)
    return UnitCosts(seq_len, per_head, per_neuron, dense)


def masked_macs(structure: MaskStructure, unit_head_mask: torch.Tensor, neuron_mask: torch.Tensor, seq_len: int) -> int:
    """MACs per sequence of the units a mask keeps (nonzero entries). ``unit_head_mask``: [n_layers, n_head_units].

    bert-like models are counted by ``mac_cost.model_macs`` (matrix by matrix), llama-like ones by unit costs.
    """
    if structure.family != "llama-like":
        return model_macs(unit_head_mask, neuron_mask, seq_len, structure.hidden_size, structure.head_dim)
    costs = unit_costs(structure, seq_len)
    return int((unit_head_mask != 0).sum()) * costs.per_head_unit + int((neuron_mask != 0).sum()) * costs.per_neuron


def flops_budget(costs: UnitCosts, target_sparsity: float) -> float:
    """MACs allowed: ``(1 - target_sparsity) * dense``. Raises ValueError unless 0 <= target_sparsity < 1."""
    if isinstance(target_sparsity, bool) or not 0 <= float(target_sparsity) < 1:  # also rejects NaN
        raise ValueError(
            f"target_sparsity={target_sparsity!r} (the fraction of head+FFN FLOPs to remove) cannot be met: it must be "
            f"in [0, 1); 1 would remove every attention head and FFN neuron"
        )
    return (1.0 - float(target_sparsity)) * costs.dense


def search_masks_under_flops(
    structure: MaskStructure,
    head_importance: torch.Tensor,
    neuron_importance: torch.Tensor,
    budget: float,
    costs: UnitCosts,
    width_multiple: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool (unit_head_mask [n_layers, n_head_units], neuron_mask [n_layers, n_neurons]) with the largest retained
    Fisher importance whose MACs fit ``budget``, every block keeping a multiple of ``width_multiple`` FFN neurons:
    the exact search with this family's unit costs (``neuron_blocks``)."""
    if not 0 <= budget <= costs.dense:
        raise ValueError(f"MAC budget {budget!r} cannot be met: it must be in [0, {costs.dense}] (dense)")
    return search_blocks_under_unit_costs(head_importance, neuron_importance, budget, costs.per_head_unit,
                                          costs.per_neuron, width_multiple)
