"""Outlier-weighted layer-wise sparsity (OWL; Yin et al. 2024, arXiv:2310.05175; reference ``lib/prune.py``).

LLMs hold a few activation outliers, unevenly over their blocks, and pruning a block rich in them costs more. OWL
measures each block's *outlier ratio*: the share of its Wanda scores ``|W_ij| * ||X_j||`` (over all its pruned
layers together) above ``m`` times their mean. Blocks with more outliers are pruned less:

    D_b      = outlier ratio of block b
    d_b      = 2 * lam * (D_b - min D) / (max D - min D)        in [0, 2 * lam]
    sparsity_b = target - (d_b - mean d)

The reference shifts by the plain mean over blocks (its blocks are equal in size); here the mean is weighted by the
blocks' parameter counts, which is the same for equal blocks and keeps the average over the pruned weights at the
target otherwise. ``pruned_counts`` then turns the sparsities into whole weights per layer that add up to exactly
``int(total * target)``, and ``row_counts`` spreads a layer's count over its rows.
"""

from collections.abc import Iterable, Mapping, Sequence

import torch

__all__ = ["apportion", "block_sizes", "outlier_ratio", "owl_sparsities", "pruned_counts", "row_counts"]


def outlier_ratio(scores: Iterable[torch.Tensor], m: float) -> float:
    """Share of all the given scores (one block's layers, taken together) above ``m`` times their mean."""
    flat = torch.cat([s.detach().flatten().double() for s in scores])
    if flat.numel() == 0:
        raise ValueError("outlier_ratio needs at least one score")
    return float((flat > flat.mean() * m).sum()) / flat.numel()


def owl_sparsities(ratios: Sequence[float], sizes: Sequence[int], target: float, lam: float) -> list[float]:
    """Per-block sparsities from the blocks' outlier ratios (see the module docstring); ``sizes``: each block's
    pruned parameters. Raises ValueError when a block's sparsity would leave [0, 1)."""
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError(f"need one outlier ratio per block, got {len(ratios)} ratios for {len(sizes)} blocks")
    if not 0 <= lam:
        raise ValueError(f"owl_lambda must be >= 0, got {lam}")
    low, high = min(ratios), max(ratios)
    spread = [0.0] * len(ratios) if high == low else [2 * lam * (r - low) / (high - low) for r in ratios]
    mean = sum(d * n for d, n in zip(spread, sizes)) / sum(sizes)
    sparsities = [target - (d - mean) for d in spread]
    outside = [(b, round(s, 4)) for b, s in enumerate(sparsities) if not 0 <= s < 1]
    if outside:
        raise ValueError(f"owl_lambda {lam} spreads the block sparsities around {target} beyond [0, 1) (block, "
                         f"sparsity: {outside}); use a smaller owl_lambda")
    return sparsities


def apportion(total: int, quotas: Sequence[float], capacities: Sequence[int]) -> list[int]:
    """Whole numbers adding up to ``total``: each the floor of its quota or one more (largest remainders first, ties
    by position), never above its capacity (an entry at its capacity passes its share on)."""
    counts = [min(int(q), c) for q, c in zip(quotas, capacities)]
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - int(quotas[i])), i))
    missing = total - sum(counts)
    for i in order * 2:  # a second round only when capped entries left some over
        if missing <= 0:
            break
        if counts[i] < capacities[i]:
            counts[i] += 1
            missing -= 1
    if missing != 0:
        raise ValueError(f"cannot place {total} in capacities {list(capacities)}")
    return counts


def block_sizes(layer_sizes: Mapping[str, int], layer_block: Mapping[str, int]) -> dict[int, int]:
    """Each block's pruned parameters (the sum of its layers' sizes), by block index in increasing order."""
    return {b: sum(n for name, n in layer_sizes.items() if layer_block[name] == b)
            for b in sorted(set(layer_block.values()))}


def pruned_counts(layer_sizes: Mapping[str, int], layer_block: Mapping[str, int], block_sparsity: Mapping[int, float],
                  target: float) -> dict[str, int]:
    """Weights to prune per layer: ``int(total * target)`` in all, shared among blocks by their sparsities, then
    among each block's layers by size."""
    total = sum(layer_sizes.values())
    sizes_by_block = block_sizes(layer_sizes, layer_block)
    blocks, sizes = list(sizes_by_block), list(sizes_by_block.values())
    quotas = [n * block_sparsity[b] for b, n in zip(blocks, sizes)]
    if abs(sum(quotas) - total * target) > 1e-6 * total + 1:
        raise ValueError(f"block sparsities {block_sparsity} do not average to {target} over the blocks' weights")
    per_block = apportion(int(total * target), quotas, sizes)
    counts: dict[str, int] = {}
    for block, size, count in zip(blocks, sizes, per_block):
        names = [name for name in layer_sizes if layer_block[name] == block]
        layers = [layer_sizes[name] for name in names]
        counts.update(zip(names, apportion(count, [count * n / size for n in layers], layers)))
    return counts


def row_counts(count: int, rows: int, row_length: int) -> torch.Tensor:
    """[rows] weights to prune per row, adding up to ``count``: the same in every row, the first ``count % rows``
    rows one more."""
    if not 0 <= count <= rows * row_length:
        raise ValueError(f"cannot prune {count} weights of {rows} rows of {row_length}")
    counts = torch.full((rows,), count // rows, dtype=torch.long)
    counts[: count % rows] += 1
    return counts
