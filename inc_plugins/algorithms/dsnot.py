"""DSnoT (Zhang et al. 2024, arXiv:2310.08915): training-free fine-tuning of a sparse mask, as INC 3.7.1's
``prune_wanda(..., dsnot=True)`` runs it (``neural_compressor/compression/pruner/dsnot.py``, unstructured).

Pruning row i's weights changes its expected output by ``e_i = sum over pruned j of W_ij * mean(x_j)``. DSnoT swaps
pruned and kept weights, one pair per row per cycle, to drive ``e_i`` towards 0 without changing the count:

- *grow* a pruned weight: the one whose ``W_ij * mean(x_j) / var(x_j)`` is largest when ``e_i > 0`` (it gives back
  most of the lost output for the least variance), smallest when ``e_i <= 0``; each end of that order is walked once;
- *prune* a kept weight: kept weights in increasing Wanda score, those with a negative ``W_ij * mean(x_j)`` first and
  the positive ones after them in reverse, taken from the front when ``e_i >= 0`` and from the back when ``e_i < 0``;
- a row stops for good once ``|e_i|`` is at most ``update_threshold``; at most ``max_cycles`` cycles.

Where the reference goes wrong on narrow rows this stops the row instead: the reference keeps walking a stopped
row's orders and writing its next pair back, which is harmless until a walk reaches the kept weights in the middle
of the grow order (it then prunes them, changing the row's count) or runs past an order's end (it then fails). On
rows as wide as an LLM's, 100 cycles never get there, and the masks are the reference's.

The statistics are the reference's (``InputFeatureMoments``, in its float32 arithmetic), so masks are INC's up to
float ties. ``mean(x_j)`` is the reference's ``sum_metric_row``: the sum over tokens divided by the number of
samples, a mean up to a factor every row shares.

The mask DSnoT starts from need not be Wanda's: the paper and its code (``--initial_method``) also start from
magnitude's. ``initial_scores`` chooses the starting mask; the kept weights are still offered for pruning in Wanda's
order, as the authors' code does.

N:M (``dsnot_nm_keep_mask``; the reference's ``prune_n`` branch, which INC's ``DSnoT`` has but its ``prune_wanda``
never passes ``prune_n`` to, so INC's N:M with ``dsnot=True`` ends unstructured): a swap must stay inside one group of
M, so each cycle grows the next pruned weight of the grow order and prunes the kept weight of the lowest starting
score in *its* group; a row also stops when a swap would flip the sign of ``e_i`` (the reference's rule there).
"""

from collections.abc import Sequence

import torch

from .nm_mask import nm_mask

__all__ = ["InputFeatureMoments", "dsnot_keep_mask", "dsnot_nm_keep_mask"]


class InputFeatureMoments:
    """Per input feature: the sum of its activations over the tokens divided by the number of samples, and its
    variance pooled over batches (each batch's variance weighted by its tokens, as the reference pools them)."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.variance: torch.Tensor | None = None
        self.num_samples = 0
        self.num_tokens = 0

    def update(self, rows: torch.Tensor, num_samples: int) -> None:
        """Add activations ``rows`` ``[tokens, in_features]`` from ``num_samples`` samples."""
        x = rows.detach().float().T  # [in_features, tokens], the reference's layout
        if self.sums is None:
            self.sums = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        self.sums *= self.num_samples / (self.num_samples + num_samples)
        self.num_samples += num_samples
        variance, tokens = torch.var(x, dim=1, unbiased=False), x.shape[1]
        self.variance = (variance if self.num_tokens == 0
                         else (self.variance * self.num_tokens + variance * tokens) / (self.num_tokens + tokens))
        self.num_tokens += tokens
        self.sums += torch.sum(x, dim=1) / self.num_samples

    @classmethod
    def combined(cls, parts: "Sequence[InputFeatureMoments]") -> "InputFeatureMoments":
        """The statistics of all ``parts``' samples together (one per process, each over its own calibration shard):
        sums weighted by sample counts, pooled variances by token counts, added in the order given."""
        samples, tokens = sum(part.num_samples for part in parts), sum(part.num_tokens for part in parts)
        combined = cls()
        combined.num_samples, combined.num_tokens = samples, tokens
        combined.sums = sum(part.sums * (part.num_samples / samples) for part in parts)
        combined.variance = sum(part.variance * (part.num_tokens / tokens) for part in parts)
        return combined

    def reordered(self, order: torch.Tensor) -> "InputFeatureMoments":
        """The same statistics with the features in ``order`` (an N:M view's column order)."""
        moments = InputFeatureMoments()
        moments.sums, moments.variance = self.sums[order], self.variance[order]
        moments.num_samples, moments.num_tokens = self.num_samples, self.num_tokens
        return moments


def _signed_order(values: torch.Tensor) -> torch.Tensor:
    """Per row, positions: the negative entries in order, then the positive ones in reverse (the reference's
    ``return_reorder_indice``, zeros included as it treats them)."""
    columns = torch.arange(values.shape[1], device=values.device).to(torch.float64).repeat(values.shape[0], 1)
    positive, negative = columns.clone(), columns.clone()
    positive[~(values > 0)] = float("inf")
    negative[~(values < 0)] = float("inf")
    positive = torch.flip(torch.sort(positive, dim=1).values, dims=[1])
    negative = torch.sort(negative, dim=1).values
    negative[negative == float("inf")] = 0
    positive[positive == float("inf")] = 0
    return (positive + negative).to(torch.int64)


def _walk(order: torch.Tensor, from_back: torch.Tensor, pointers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the entry of ``order`` at the row's front pointer (``from_back`` False) or back pointer, that
    pointer moved one step inwards, and whether the pointer was still inside ``order`` (the reference reads past
    the end, and fails, where a row has run out of candidates)."""
    side = from_back.to(torch.int64)
    position = pointers.gather(1, side)
    pointers.scatter_(1, side, position + torch.where(side == 0, 1, -1))
    inside = (position >= 0) & (position < order.shape[1])
    return order.gather(1, position.clamp(0, order.shape[1] - 1)), inside


def _grow_order(expected: torch.Tensor, pruned: torch.Tensor, moments: InputFeatureMoments,
                var_power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``e_i`` ``[out, 1]``, and its positions by ``W_ij * mean(x_j) / var(x_j) ** var_power``, the kept
    weights counted as 0 (the order pruned weights are grown in, from either end)."""
    lost = torch.where(pruned, expected, torch.zeros_like(expected))
    error = lost.sum(dim=1, keepdim=True)
    if var_power:
        lost /= torch.pow(moments.variance.reshape(1, -1), var_power)
    return error, torch.sort(lost, dim=1, stable=True).indices


def dsnot_keep_mask(weight: torch.Tensor, scores: torch.Tensor, moments: InputFeatureMoments,
                    sparsity: float, var_power: float = 1.0, max_cycles: int = 100,
                    update_threshold: float = 0.1, initial_scores: torch.Tensor | None = None) -> torch.Tensor:
    """Keep mask ``[out, in]`` (True = keep): the per-row mask from ``initial_scores`` (default ``scores``), then
    DSnoT's swaps.

    ``weight``: ``[out, in]``; ``scores``: its Wanda scores; ``moments``: the layer's input statistics. Every row
    keeps its count of pruned weights, ``int(in * sparsity)``.
    """
    rows, columns = scores.shape
    expected = weight * moments.sums.reshape(1, -1)  # W_ij * mean(x_j): what each weight adds to the output
    pruned_count = int(columns * sparsity)
    order = torch.sort(scores if initial_scores is None else initial_scores, dim=-1, stable=True).indices
    initially_pruned = order[:, :pruned_count]
    pruned = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, initially_pruned, True)

    error, grow_order = _grow_order(expected, pruned, moments, var_power)
    kept_by_score = torch.sort(scores.clone().scatter_(1, initially_pruned, float("inf")), dim=1,
                               stable=True).indices[:, : columns - pruned_count]
    prune_order = kept_by_score.gather(1, _signed_order(expected.gather(1, kept_by_score)))

    grow_pointers = torch.tensor([0, columns - 1], device=scores.device).repeat(rows, 1)
    prune_pointers = torch.tensor([0, prune_order.shape[1] - 1], device=scores.device).repeat(rows, 1)
    active = torch.ones_like(error, dtype=torch.bool)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        grow, grow_inside = _walk(grow_order, error > 0, grow_pointers)
        shrink, shrink_inside = _walk(prune_order, error < 0, prune_pointers)
        grown_value, pruned_value = expected.gather(1, grow), expected.gather(1, shrink)
        # A swap grows a pruned weight and prunes a kept one. A row whose next pair is not such a pair (its walk
        # reached the order's middle, or ran past its end) stops: the reference would prune a kept weight there, or
        # fail; on rows of LLM width a walk never gets that far within max_cycles.
        real = (grow_inside & shrink_inside & pruned.gather(1, grow) & ~pruned.gather(1, shrink))
        active &= (error.abs() > update_threshold) & real
        pruned.scatter_(1, shrink, pruned.gather(1, shrink) | active)
        pruned.scatter_(1, grow, pruned.gather(1, grow) & ~active)
        error += torch.where(active, pruned_value, torch.zeros_like(pruned_value))
        error -= torch.where(active, grown_value, torch.zeros_like(grown_value))
    return ~pruned


def dsnot_nm_keep_mask(weight: torch.Tensor, initial_scores: torch.Tensor, moments: InputFeatureMoments, n: int,
                       m: int, var_power: float = 1.0, max_cycles: int = 100,
                       update_threshold: float = 0.1) -> torch.Tensor:
    """Keep mask ``[out, in]`` (True = keep): the N:M mask pruning the ``n`` lowest ``initial_scores`` of every ``m``
    consecutive inputs (``nm_mask``), then DSnoT's swaps within the groups (module docstring). Every group keeps
    exactly ``m - n`` weights.
    """
    pruned = ~nm_mask(initial_scores, n, m)  # (nm_mask checks the shapes)
    expected = weight * moments.sums.reshape(1, -1)
    error, grow_order = _grow_order(expected, pruned, moments, var_power)
    start_sign = torch.sign(error)
    # the kept weights' starting scores, to pick the one a swap prunes in each group; pruned (or swapped out): inf
    offer = torch.where(pruned, float("inf"), initial_scores.float())
    pointers = torch.tensor([0, grow_order.shape[1] - 1], device=weight.device).repeat(weight.shape[0], 1)
    active = torch.ones_like(error, dtype=torch.bool)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        grow, grow_inside = _walk(grow_order, error > 0, pointers)
        group = grow - grow % m + torch.arange(m, device=weight.device)  # [out, m]: the grown weight's group
        lowest, position = offer.gather(1, group).min(dim=1, keepdim=True)
        shrink = group.gather(1, position)
        grown_value, pruned_value = expected.gather(1, grow), expected.gather(1, shrink)
        # a real swap: the grown weight is pruned and its group still has a kept weight to give up
        real = grow_inside & pruned.gather(1, grow) & torch.isfinite(lowest)
        after = error + pruned_value - grown_value
        active &= (error.abs() > update_threshold) & (torch.sign(after) == start_sign) & real
        pruned.scatter_(1, shrink, pruned.gather(1, shrink) | active)
        pruned.scatter_(1, grow, pruned.gather(1, grow) & ~active)
        offer.scatter_(1, shrink, torch.where(active, float("inf"), offer.gather(1, shrink)))
        error = torch.where(active, after, error)
    return ~pruned
