"""Wanda (Sun et al. 2023, arXiv:2306.11695): score S_ij = |W_ij| * ||X_j||_2 and the masks built from it.

Every weight here is a matrix ``[out_features, in_features]`` (see ``inc_plugins.models.layer_views`` for
turning Linear / Conv1D / Conv2d layers into one). Every mask is a bool tensor shaped like its scores:
``True`` = keep the weight, ``False`` = prune it.

Ties: candidates are ranked with a *stable* ascending sort, so among equal scores the one with the lower
index is pruned first (column index within a row for ``per_output_mask``; row-major flat index for
``per_layer_mask``; layers in the dict's order, then row-major, for ``global_masks``). This is the order INC
3.7.1's ``prune_wanda`` uses (``torch.sort(..., stable=True)``), so per-output masks match it even on ties.
``variant_mask`` has no index order: like the reference it prunes every score at or below a row threshold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

# The reference's bisection for the variant: start at alpha 0.4 inside [0, 0.8], stop once the sparsity is
# within 0.001 of the target or the bracket is narrower than 0.001 (so at most 10 halvings).
_VARIANT_ALPHA_START = 0.4
_VARIANT_ALPHA_MAX = 0.8
_VARIANT_SPARSITY_TOLERANCE = 0.001
_VARIANT_MIN_BRACKET = 0.001


class InputFeatureNorms:
    """Per input feature j, ||X_j||_2^2 over all calibration tokens divided by the number of samples, in float32.

    This is the reference's statistic (and INC 3.7.1's ``prune_wanda``), computed with the same float32
    arithmetic: a running average over samples, rescaled before each batch is added. Scores built from it are
    therefore bit-identical to the reference's for the same batches, so masks agree even on near-ties. The
    division by the number of samples scales every score of a layer alike, so per-output, per-layer, N:M and
    variant masks are those of the plain norm.
    """

    def __init__(self, keep_batches: bool = False) -> None:
        self._mean_over_samples: torch.Tensor | None = None
        self.num_samples = 0
        # with keep_batches, each batch's ||X_j||^2 and samples, for `combined` to replay in one process's order
        self.batches: list[tuple[torch.Tensor, int]] | None = [] if keep_batches else None

    def update(self, rows: torch.Tensor, num_samples: int) -> None:
        """Add activations ``rows`` ``[tokens, in_features]`` (any floating dtype) from ``num_samples`` samples.

        A sample is one sequence (or image) of the batch: ``input_samples`` in ``inc_plugins.models.layer_views``
        counts them for a layer's input.
        """
        if rows.dim() != 2:
            raise ValueError(f"rows must have shape [tokens, in_features], got shape {list(rows.shape)}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int (the batch's number of samples), got {num_samples!r}")
        if self._mean_over_samples is not None and rows.shape[1] != self._mean_over_samples.numel():
            raise ValueError(
                f"rows have {rows.shape[1]} features but earlier batches had {self._mean_over_samples.numel()}"
            )
        # Squaring in float32 keeps bf16/fp16 activations from losing most of their mantissa.
        self._add(torch.norm(rows.detach().float().T, p=2, dim=1) ** 2, num_samples)

    def _add(self, squared_norms: torch.Tensor, num_samples: int) -> None:
        # The reference's order of operations, kept exactly (see the class docstring).
        if self._mean_over_samples is None:
            self._mean_over_samples = torch.zeros_like(squared_norms)
        self._mean_over_samples *= self.num_samples / (self.num_samples + num_samples)
        self.num_samples += num_samples
        self._mean_over_samples += squared_norms / self.num_samples
        if self.batches is not None:
            self.batches.append((squared_norms, num_samples))

    @classmethod
    def combined(cls, parts: Sequence[InputFeatureNorms]) -> InputFeatureNorms:
        """The statistic of all ``parts``' samples together (e.g. one per process, each over its own calibration
        shard). Parts that kept their batches are replayed batch by batch, the k-th batch of every part before the
        (k+1)-th of any: when part r holds batches r, r + P, r + 2P, ... of P parts, that is one process's order
        and arithmetic, so the result is its bits. Otherwise their means weighted by their sample counts, added in
        the order given: equal up to float32 rounding."""
        if all(part.batches is not None for part in parts):
            replayed = cls()
            for k in range(max(len(part.batches) for part in parts)):
                for part in parts:
                    if k < len(part.batches):
                        replayed._add(*part.batches[k])
            return replayed
        total = sum(part.num_samples for part in parts)
        combined = cls()
        combined.num_samples = total
        combined._mean_over_samples = sum(part.squared_norms * (part.num_samples / total) for part in parts)
        return combined

    @property
    def squared_norms(self) -> torch.Tensor:
        """``[in_features]`` float32: ||X_j||_2^2 over all tokens seen, divided by the number of samples."""
        if self._mean_over_samples is None:
            raise RuntimeError("no activations were added: call update() with at least one row first")
        return self._mean_over_samples


ROW_CHUNK = 1024  # rows sorted at once by the per-row masks


def wanda_scores(weight: torch.Tensor, feature_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda scores ``|W_ij| * sqrt(feature_sq_norms_j)``, float32, shape ``[out_features, in_features]``.

    ``weight`` is ``[out_features, in_features]``; ``feature_sq_norms`` is ``[in_features]`` (for example
    ``InputFeatureNorms.squared_norms``).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [out_features, in_features], got shape {list(weight.shape)}")
    if feature_sq_norms.shape != (weight.shape[1],):
        raise ValueError(
            f"feature_sq_norms must have shape [in_features] = [{weight.shape[1]}], "
            f"got shape {list(feature_sq_norms.shape)}"
        )
    # one float32 copy, then in place: a 7B down projection's scores take 235 MB, not three times that
    return weight.detach().to(torch.float32, copy=True).abs_().mul_(feature_sq_norms.detach().float().sqrt())


def _check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1) (the fraction of weights pruned), got {sparsity!r}")


def _check_matrix(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [out_features, in_features], got shape {list(scores.shape)}")


def _prune_lowest(flat_scores: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Keep mask for a 1-D tensor, pruning its ``num_pruned`` lowest entries (lower index first on ties)."""
    keep = torch.ones_like(flat_scores, dtype=torch.bool)
    order = torch.sort(flat_scores, stable=True).indices
    keep[order[:num_pruned]] = False
    return keep


def per_output_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask ``[out_features, in_features]`` pruning the same number of lowest scores in every row.

    Each row prunes ``int(in_features * sparsity)`` weights, the reference's rounding (a plain truncation of
    the float product, so e.g. ``int(100 * 0.29) == 28``).
    """
    _check_matrix(scores)
    _check_sparsity(sparsity)
    num_pruned = int(scores.shape[1] * sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    for rows, order in _row_orders(scores):
        keep[rows].scatter_(1, order[:, :num_pruned], False)
    return keep


def _row_orders(scores: torch.Tensor):
    """(row slice, each row's stable ascending order) for ``ROW_CHUNK`` rows at a time: rows rank independently, and
    a whole [14336, 4096] layer's int64 order would take 470 MB."""
    for start in range(0, scores.shape[0], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        yield rows, torch.sort(scores[rows], dim=1, stable=True).indices


def rows_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep mask ``[out_features, in_features]`` pruning the ``counts[r]`` lowest scores of row ``r``."""
    _check_matrix(scores)
    if counts.shape != scores.shape[:1] or bool((counts < 0).any() | (counts > scores.shape[1]).any()):
        raise ValueError(f"counts must be [{scores.shape[0]}] within [0, {scores.shape[1]}], got {counts.tolist()}")
    pruned_in_order = torch.arange(scores.shape[1], device=scores.device) < counts.to(scores.device)[:, None]
    keep = torch.ones_like(scores, dtype=torch.bool)
    for rows, order in _row_orders(scores):
        keep[rows].scatter_(1, order, ~pruned_in_order[rows])
    return keep


def per_layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask shaped like ``scores`` pruning the ``int(numel * sparsity)`` lowest scores of the whole matrix."""
    _check_sparsity(sparsity)
    return _prune_lowest(scores.flatten(), int(scores.numel() * sparsity)).reshape(scores.shape)


def global_masks(scores_by_name: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep masks for several layers pruning the ``int(total * sparsity)`` lowest scores across all of them.

    ``scores_by_name`` maps a layer name to its scores (``[out_features, in_features]``, same device for all);
    the result maps the same names to masks of the same shapes.
    """
    _check_sparsity(sparsity)
    if not scores_by_name:
        raise ValueError("global_masks needs the scores of at least one layer, got an empty mapping")
    flat = torch.cat([scores.flatten().float() for scores in scores_by_name.values()])
    keep = _prune_lowest(flat, int(flat.numel() * sparsity))
    pieces = keep.split([scores.numel() for scores in scores_by_name.values()])
    return {name: piece.reshape(scores.shape) for (name, scores), piece in zip(scores_by_name.items(), pieces)}


def _variant_keep_mask(
    scores: torch.Tensor, sorted_scores: torch.Tensor, cumulative: torch.Tensor, row_sums: torch.Tensor, alpha: float
) -> torch.Tensor:
    in_prefix = cumulative <= (row_sums * alpha).unsqueeze(1)
    prefix_length = in_prefix.sum(dim=1, keepdim=True)
    # The reference takes the last score of the prefix as a threshold and prunes every score <= it, so ties
    # with the threshold go too. An empty prefix (the reference would index -1 and fail) prunes nothing.
    threshold = sorted_scores.gather(1, (prefix_length - 1).clamp(min=0))
    pruned = (scores <= threshold) & (prefix_length > 0)
    return ~pruned


def variant_mask(scores: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, float]:
    """The Wanda variant: per row, prune the smallest scores whose cumulative sum is <= alpha * the row sum.

    ``alpha`` is the same for all rows and is found by the reference's bisection so that the sparsity of the
    whole matrix is within 0.001 of ``sparsity``. Returns ``(keep mask [out_features, in_features], alpha)``.
    Sparsity 0 keeps everything (alpha 0). Raises ValueError if no alpha in [0, 0.8] gets within 0.001.
    """
    _check_matrix(scores)
    _check_sparsity(sparsity)
    if sparsity == 0:
        return torch.ones_like(scores, dtype=torch.bool), 0.0
    sorted_scores = torch.sort(scores, dim=1, stable=True).values
    cumulative = sorted_scores.cumsum(dim=1)
    # Row sums of the unsorted scores, as the reference: they can differ from cumulative[:, -1] in the last bit.
    row_sums = scores.sum(dim=1)

    def keep_and_sparsity(alpha: float) -> tuple[torch.Tensor, float]:
        keep = _variant_keep_mask(scores, sorted_scores, cumulative, row_sums, alpha)
        return keep, (~keep).sum().item() / keep.numel()

    alpha, low, high = _VARIANT_ALPHA_START, 0.0, _VARIANT_ALPHA_MAX
    keep, achieved = keep_and_sparsity(alpha)
    while abs(achieved - sparsity) > _VARIANT_SPARSITY_TOLERANCE and high - low >= _VARIANT_MIN_BRACKET:
        if achieved > sparsity:
            alpha, high = (alpha + low) / 2.0, alpha
        else:
            alpha, low = (alpha + high) / 2.0, alpha
        keep, achieved = keep_and_sparsity(alpha)
    if abs(achieved - sparsity) > _VARIANT_SPARSITY_TOLERANCE:
        raise ValueError(
            f"the Wanda variant could not reach sparsity {sparsity} within {_VARIANT_SPARSITY_TOLERANCE}: "
            f"the last try gave {achieved:.6f} at alpha {alpha:.6f} (alpha is searched in [0, {_VARIANT_ALPHA_MAX}] "
            f"as in the reference); use per_output_mask, or a sparsity this matrix's scores can reach"
        )
    return keep, alpha
