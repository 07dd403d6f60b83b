"""FFN widths that are multiples of m: the mask searches over blocks of m neurons (the ``width_multiple`` setting).

Matrix kernels run fastest at widths that fill their vector registers and tiles, so a layer that keeps 1000 FFN
neurons can cost as much as one that keeps 1024. ``width_multiple=m`` makes every layer keep a multiple of m
neurons, and does it INSIDE the search rather than by rounding its result (which would break the budget or waste
it): within a layer the neurons are ranked by importance and cut into blocks of m consecutive ranks, a block's
importance is the sum of its members' and its cost is m neurons' cost. The blocks of a layer have non-increasing
importance, so ranking all blocks globally (ties to the lower layer, then the lower block) takes a prefix of every
layer's blocks, and each layer keeps its k*m most important neurons.

Exactness under the FLOPs (unit-cost) constraint: a mask that keeps k_l*m neurons in layer l is at best the top
k_l*m neurons of each layer, i.e. its first k_l blocks, so the best block-granular mask is the best choice of
blocks; every block costs the same, so ``search_masks_under_unit_costs`` over blocks is exact for it by its own
argument. The latency search (``search_masks_under_latency``) runs over blocks with the table read at multiples of
m, and stays the heuristic it is.

m must divide the FFN width: a last, partial block would cost less than the others, and choosing blocks of
unequal costs is a knapsack that the prefix argument above does not solve. Attention heads are not rounded: a head
(or key/value group) is already ``head_dim`` (64 in the supported models) wide in every projection, so any number
of kept heads gives projection widths that are multiples of 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .mask_search import search_masks_under_latency, search_masks_under_unit_costs

__all__ = ["NeuronBlocks", "check_width_multiple", "neuron_blocks", "search_blocks_under_unit_costs",
           "search_blocks_under_latency"]


def check_width_multiple(multiple: int, n_neurons: int) -> None:
    """Raise ValueError unless ``multiple`` is an int >= 1 that divides ``n_neurons`` (the FFN width)."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1 or n_neurons % multiple:
        divisors = [d for d in (1, 2, 4, 8, 16, 32, 64, 128) if n_neurons % d == 0]
        raise ValueError(f"width_multiple={multiple!r} must be an int >= 1 that divides the FFN width {n_neurons} "
                         f"(e.g. {', '.join(map(str, divisors))}), or 'auto' with a latency table")


@dataclass(frozen=True)
class NeuronBlocks:
    """A layer's neurons in blocks of ``multiple`` consecutive importance ranks, most important block first."""

    multiple: int
    members: torch.Tensor  # [n_layers, n_blocks, multiple] neuron indices within each layer
    importance: torch.Tensor  # [n_layers, n_blocks] float64: the sum of the members' importance, non-increasing

    def neuron_mask(self, block_mask: torch.Tensor) -> torch.Tensor:
        """[n_layers, n_blocks] bool kept blocks -> [n_layers, n_neurons] bool kept neurons."""
        n_layers, n_blocks, multiple = self.members.shape
        mask = torch.zeros(n_layers, n_blocks * multiple, dtype=torch.bool)
        kept = block_mask.unsqueeze(-1).expand_as(self.members)
        rows = torch.arange(n_layers).view(-1, 1, 1).expand_as(self.members)
        mask[rows[kept], self.members[kept]] = True
        return mask


def neuron_blocks(neuron_importance: torch.Tensor, multiple: int) -> NeuronBlocks:
    """Blocks of ``multiple`` neurons of ``neuron_importance`` [n_layers, n_neurons]; ties within a layer go to the
    lower index (a stable sort), as in the unit search."""
    n_layers, n_neurons = neuron_importance.shape
    check_width_multiple(multiple, n_neurons)
    scores, order = torch.sort(neuron_importance.double(), dim=1, descending=True, stable=True)
    members = order.view(n_layers, n_neurons // multiple, multiple)
    return NeuronBlocks(multiple, members, scores.view(n_layers, -1, multiple).sum(dim=2))


def search_blocks_under_unit_costs(
    head_importance: torch.Tensor, neuron_importance: torch.Tensor, budget: float, per_head: float, per_neuron: float,
    multiple: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``search_masks_under_unit_costs`` restricted to masks that keep a multiple of ``multiple`` neurons in every
    layer: exact over those masks (module docstring). Same arguments and returns, plus ``multiple``."""
    blocks = neuron_blocks(neuron_importance, multiple)
    head_mask, block_mask = search_masks_under_unit_costs(head_importance, blocks.importance, budget, per_head,
                                                          per_neuron * multiple)
    return head_mask, blocks.neuron_mask(block_mask)


def search_blocks_under_latency(
    head_importance: torch.Tensor, neuron_importance: torch.Tensor, latency_budget: float,
    head_latency: torch.Tensor, neuron_latency: torch.Tensor, multiple: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``search_masks_under_latency`` over blocks of ``multiple`` neurons: ``neuron_latency`` [n_neurons + 1] is
    read at 0, m, 2m, ... Same arguments and returns, plus ``multiple``."""
    blocks = neuron_blocks(neuron_importance, multiple)
    neuron_latency = torch.as_tensor(neuron_latency, dtype=torch.float64)
    if neuron_latency.dim() != 1 or neuron_latency.numel() != neuron_importance.shape[1] + 1:
        raise ValueError(f"neuron_latency must be 1-D with {neuron_importance.shape[1] + 1} entries (0..n_neurons), "
                         f"got shape {tuple(neuron_latency.shape)}")
    head_mask, block_mask = search_masks_under_latency(head_importance, blocks.importance, latency_budget,
                                                       head_latency, neuron_latency[::multiple])
    return head_mask, blocks.neuron_mask(block_mask)
