"""N:M semi-structured masks along the input dimension, in INC's convention: N of every M are PRUNED.

So "2:4" prunes 2 and keeps 2 of every 4 consecutive input weights of a row, and "1:4" prunes 1 and keeps 3.
Masks are bool tensors ``[out_features, in_features]``: ``True`` = keep, ``False`` = prune.

Ties: within a group the ``n`` lowest scores are chosen by ``torch.topk``, exactly as the Wanda reference and
INC 3.7.1's ``prune_wanda`` choose them, so the masks are theirs even where scores tie. torch leaves topk's tie
order unspecified; on CPU a tie currently goes to the higher input index.
"""

import torch


def _check_nm(n: int, m: int) -> None:
    for name, value in (("N", n), ("M", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"N:M needs integer N and M, got {name}={value!r}")
    if not 1 <= n < m:
        raise ValueError(f"N:M needs 1 <= N < M (N = number pruned of every M), got N={n}, M={m}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask ``[out_features, in_features]`` pruning the ``n`` lowest scores of every ``m`` consecutive inputs.

    ``scores`` is ``[out_features, in_features]`` with ``in_features`` a multiple of ``m``; every group of ``m``
    keeps exactly ``m - n`` weights.
    """
    _check_nm(n, m)
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [out_features, in_features], got shape {list(scores.shape)}")
    out_features, in_features = scores.shape
    if in_features % m != 0:
        raise ValueError(
            f"N:M {n}:{m} needs in_features to be a multiple of {m}, but the scores have shape "
            f"[{out_features}, {in_features}] (in_features={in_features})"
        )
    groups = scores.reshape(out_features, in_features // m, m)
    # One batched topk over [out, groups, m] picks what the reference's loop of topk calls over [out, m] slices picks.
    lowest = torch.topk(groups, n, dim=2, largest=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(2, lowest, False)
    return keep.reshape(out_features, in_features)
