"""Wanda's global comparison group without holding every layer's scores: a radix selection over two passes.

``global_masks`` (``algorithms.wanda``) prunes the ``int(total * sparsity)`` lowest scores of all layers at once, so it
needs every score in memory: 26 GB of float32 at 7B. A pruner only needs how many weights each layer loses
(``pruned_counts``), and those follow from the threshold score ``t`` (the k-th lowest) and, per layer, how many scores
lie below ``t`` and how many equal it: ``global_masks`` prunes every score below ``t`` and the ties with ``t`` with
the lowest flat index first, i.e. in layer order.

Non-negative float32 values order as their bit patterns do as integers, so ``t`` is found digit by digit: the first
pass counts the scores per value of their upper 16 bits (one 65536-bin histogram for all layers), which fixes ``t``'s
upper half; the second counts, per layer, the lower 16 bits of the scores that share it (at most 65536 distinct
values a layer). Each pass sees one layer's scores at a time, in any order, so a streamed model holds one block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["GlobalRanking"]

_HALF = 16
_BINS = 1 << _HALF


def _bits(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.detach().float().flatten()
    if scores.numel() and bool((scores < 0).any() | scores.isnan().any()):
        raise ValueError("global ranking needs scores >= 0 without NaN (Wanda's |W| * ||X|| are)")
    return scores.abs().view(torch.int32)  # (abs: -0.0 -> 0.0)


class GlobalRanking:
    """Per-layer pruned counts equal to ``global_masks(scores, sparsity)``'s, from two passes over the layers.

    ``add_coarse(name, scores)`` for every layer, then ``add_fine(name, scores)`` for every layer with the same scores,
    then ``pruned_counts(order)`` with the layers in the order ``global_masks`` would concatenate them.
    """

    def __init__(self, sparsity: float):
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1) (the fraction of weights pruned), got {sparsity!r}")
        self.sparsity = float(sparsity)
        self._coarse = torch.zeros(_BINS, dtype=torch.int64)
        self._sizes: dict[str, int] = {}
        self._upper: int | None = None  # t's upper 16 bits, fixed after the first pass
        self._below_upper: dict[str, int] = {}  # per layer: scores whose upper bits are below t's
        self._lower: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer: (lower bits, counts) sharing t's

    @property
    def _pruned_total(self) -> int:
        return int(sum(self._sizes.values()) * self.sparsity)

    def add_coarse(self, name: str, scores: torch.Tensor) -> None:
        if self._upper is not None:
            raise RuntimeError("add_coarse after add_fine: the first pass is over")
        if name in self._sizes:
            raise ValueError(f"layer {name!r} was added twice")
        self._coarse += torch.bincount(_bits(scores) >> _HALF, minlength=_BINS)
        self._sizes[name] = scores.numel()

    def add_fine(self, name: str, scores: torch.Tensor) -> None:
        if name not in self._sizes or scores.numel() != self._sizes[name]:
            raise ValueError(f"layer {name!r} is not the one the first pass saw")
        if self._upper is None:
            # the bin of the k-th lowest score: the first whose running count reaches k (k >= 1; k = 0 prunes none)
            self._upper = int(torch.searchsorted(self._coarse.cumsum(0), max(self._pruned_total, 1)))
        bits = _bits(scores)
        upper = bits >> _HALF
        self._below_upper[name] = int((upper < self._upper).sum())
        self._lower[name] = torch.unique(bits[upper == self._upper] & (_BINS - 1), return_counts=True)

    def pruned_counts(self, order: Sequence[str]) -> dict[str, int]:
        """{layer: weights pruned}, ``order`` naming every layer once (ties go to the earlier layers first)."""
        if sorted(order) != sorted(self._sizes) or set(self._lower) != set(self._sizes):
            raise ValueError("pruned_counts needs every layer of both passes, each named once in order")
        fine = torch.zeros(_BINS, dtype=torch.int64)
        for values, counts in self._lower.values():
            fine.index_add_(0, values.long(), counts)
        in_bin = self._pruned_total - sum(self._below_upper.values())  # pruned among the scores sharing t's upper bits
        lower = int(torch.searchsorted(fine.cumsum(0), max(in_bin, 1)))  # t's lower 16 bits
        remaining, counts = self._pruned_total, {}
        for name in order:
            values, value_counts = self._lower[name]
            below = self._below_upper[name] + int(value_counts[values < lower].sum())
            counts[name] = below
            remaining -= below
        for name in order:  # the ties with t, in flat order
            values, value_counts = self._lower[name]
            ties = min(int(value_counts[values == lower].sum()), max(remaining, 0))
            counts[name] += ties
            remaining -= ties
        return counts
