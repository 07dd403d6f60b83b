"""SparseGPT's mask selection and weight update for one layer (Frantar & Alistarh 2023, arXiv:2301.00774), in torch.

The layer's weights ``W`` ``[out, in]`` are pruned column by column, from the first input to the last, and each
pruning error is spread over the not-yet-visited columns by the optimal brain surgeon update with the inverse of the
damped Hessian ``H = X^T X + λ I`` of the calibration inputs X. The rows of ``upper_inverse_factor`` (the upper
Cholesky factor of H^-1) give both the update direction and the weight's "distance" ``d``: weight w's cost is
``w^2 / d^2``. The arithmetic and choices are those of the reference code and INC 3.7.1's ``fasterprune``
(``patterns/nxm.py``, ``patterns/ninm.py``), so the weights equal INC's ``sparse_gpt`` to float tolerance:

- damping λ = ``DAMPING`` x mean(diag H) (``percdamp``); an input feature that never fired (diag 0) gets diag 1 and
  its weights are zeroed first (cost 0: they are the first pruned);
- columns are processed in blocks of ``BLOCK_SIZE``: the mask of a block is chosen when the walk enters it, from the
  weights as updated so far (the "adaptive mask selection");
- unstructured: within a block, every weight with cost at or below the ``int(n x sparsity)``-th smallest of the
  block's n costs is pruned (the reference's threshold, so ``int(n x sparsity) + 1`` weights barring ties);
- N:M (N of every M consecutive inputs pruned, INC's convention): at the first column of each group, the N weights
  of lowest cost in each row's group;
- a per-layer count (OWL's per-layer sparsities): each block prunes its share of the count exactly (the weights of
  lowest cost), the shares spread over the blocks in proportion to their widths.

The per-column loop is the reference's, with its rounding (with ``input_gram.InputGram``'s H, the weights are INC's
bit for bit on the same inputs); it runs without boolean indexing (the kept mask multiplies, which gives the same
values) and updates only the columns after the current one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BLOCK_SIZE", "DAMPING", "SparseGPTResult", "sparse_gpt_prune", "upper_inverse_factor"]

BLOCK_SIZE = 128  # columns per lazy-update block: the reference's and INC's blocksize
DAMPING = 0.01  # the reference's percdamp: λ = DAMPING x mean(diag H)


@dataclass(frozen=True)
class SparseGPTResult:
    """``weight`` ``[out, in]`` float32, pruned and updated; ``keep`` bool ``[out, in]`` (True = kept)."""

    weight: torch.Tensor
    keep: torch.Tensor


def upper_inverse_factor(gram: torch.Tensor, damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of (H + λI)^-1, H = ``gram`` with dead features' diagonal set to 1;
    ``dead`` the bool ``[in]`` features whose diagonal was 0. Raises ValueError when H + λI is not positive definite
    (NaN or Inf in it, or a damping too small for its rounding errors)."""
    h = gram.detach().to(torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    diagonal = torch.arange(h.shape[0], device=h.device)
    # the mean of a contiguous copy of the diagonal, as the reference takes it (a strided mean rounds differently)
    h[diagonal, diagonal] += damping * torch.mean(torch.diag(h))
    factor, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
    if info.item() != 0:
        raise ValueError(
            f"the damped Hessian of the calibration inputs is not positive definite (damping {damping:g} x its mean "
            f"diagonal): the inputs hold non-finite values or the damping is too small"
        )
    return factor, dead


def _block_counts(pruned_count: int, out_features: int, in_features: int, block_size: int) -> list[int]:
    """A layer's pruned count spread over its column blocks in proportion to their sizes (the remainder to the first
    blocks, one each), so the blocks add up to ``pruned_count`` exactly."""
    sizes = [out_features * (min(start + block_size, in_features) - start) for start in range(0, in_features, block_size)]
    total = out_features * in_features
    counts = [pruned_count * size // total for size in sizes]
    for index in range(pruned_count - sum(counts)):
        counts[index % len(counts)] += 1
    return counts


def _lowest(costs: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` entries of lowest cost (ties broken by position)."""
    pruned = torch.zeros(costs.numel(), dtype=torch.bool, device=costs.device)
    if count > 0:
        pruned[torch.topk(costs.flatten(), count, largest=False, sorted=False).indices] = True
    return pruned.reshape(costs.shape)


def sparse_gpt_prune(weight: torch.Tensor, gram: torch.Tensor, *, sparsity: float | None = None,
                     nm: tuple[int, int] | None = None, pruned_count: int | None = None,
                     block_size: int = BLOCK_SIZE, damping: float = DAMPING) -> SparseGPTResult:
    """SparseGPT on one layer: ``weight`` ``[out, in]`` (not modified), ``gram`` ``[in, in]`` = X^T X of its calibration
    inputs (any positive multiple: the result does not depend on the scale).

    Exactly one of ``sparsity`` (unstructured, the reference's per-block threshold), ``nm`` ((N pruned, M), along the
    inputs) or ``pruned_count`` (unstructured, exactly this many pruned) says what to prune.
    """
    if sum(value is not None for value in (sparsity, nm, pruned_count)) != 1:
        raise ValueError("give exactly one of sparsity, nm and pruned_count")
    out_features, in_features = weight.shape
    if gram.shape != (in_features, in_features):
        raise ValueError(f"gram has shape {list(gram.shape)}, expected [{in_features}, {in_features}] for a weight "
                         f"of shape {list(weight.shape)}")
    if nm is not None and (in_features % nm[1] or block_size % nm[1]):
        raise ValueError(f"N:M groups of {nm[1]} need the {in_features} inputs and the block size {block_size} to be "
                         f"multiples of {nm[1]}")
    if pruned_count is not None and not 0 <= pruned_count <= weight.numel():
        raise ValueError(f"pruned_count must be in [0, {weight.numel()}], got {pruned_count}")
    hinv, dead = upper_inverse_factor(gram, damping)
    w = weight.detach().to(torch.float32).clone()
    w[:, dead] = 0
    keep = torch.ones_like(w, dtype=torch.bool)
    counts = (_block_counts(pruned_count, out_features, in_features, block_size)
              if pruned_count is not None else None)
    for block, start in enumerate(range(0, in_features, block_size)):
        end = min(start + block_size, in_features)
        w1, hinv1 = w[:, start:end].clone(), hinv[start:end, start:end]
        errors = torch.zeros_like(w1)
        distances = torch.diagonal(hinv1)
        keep1 = torch.ones_like(w1, dtype=torch.bool)
        if nm is None:
            costs = w1 ** 2 / distances.reshape(1, -1) ** 2
            if counts is not None:
                keep1 = ~_lowest(costs, counts[block])
            else:
                threshold = torch.sort(costs.flatten())[0][int(costs.numel() * sparsity)]
                keep1 = costs > threshold
        kept = keep1.to(w1.dtype)
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                costs = w1[:, group] ** 2 / distances[group].reshape(1, -1) ** 2
                lowest = torch.topk(costs, nm[0], dim=1, largest=False).indices
                keep1[:, group].scatter_(1, lowest, False)
                kept[:, group] = keep1[:, group].to(w1.dtype)
            column = w1[:, i]
            error = column * (1 - kept[:, i]) / hinv1[i, i]  # (w - q) / d, q the column with its pruned weights 0
            column.mul_(kept[:, i])
            # the reference's separate product and subtraction (a fused addr_/addmm_ rounds differently)
            w1[:, i + 1:] -= torch.outer(error, hinv1[i, i + 1:])
            errors[:, i] = error
        w[:, start:end] = w1
        keep[:, start:end] = keep1
        w[:, end:] -= errors.matmul(hinv[start:end, end:])
    return SparseGPTResult(w, keep)
