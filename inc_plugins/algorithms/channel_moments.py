"""Per-channel mean, variance and squared norm of a layer's input over calibration tokens.

The structured pruners read a layer's input channels through these statistics: FLAP's fluctuation (the variance
over tokens) and its bias compensation (the mean), Wanda-sp's ``||X_j||_2`` (the square root of the sum of squares).
They are accumulated batch by batch with Chan et al.'s pairwise update of (count, mean, sum of squared deviations) in
float64, so batching, merging parts from several processes (``combined``) and one pass over all tokens agree to
float64 rounding, and a variance is never the difference of two large float32 sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ChannelMoments"]


class ChannelMoments:
    """Running per-channel statistics of rows ``[tokens, channels]``: ``mean``, ``variance``, ``squared_norms``."""

    def __init__(self) -> None:
        self.num_tokens = 0
        self._mean: torch.Tensor | None = None
        self._squared_deviations: torch.Tensor | None = None  # sum over tokens of (x - mean)^2

    def update(self, rows: torch.Tensor) -> None:
        """Add the activations ``rows`` ``[tokens, channels]`` (any floating dtype; an empty batch adds nothing)."""
        if rows.dim() != 2:
            raise ValueError(f"rows must have shape [tokens, channels], got shape {list(rows.shape)}")
        if self._mean is not None and rows.shape[1] != self._mean.numel():
            raise ValueError(f"rows have {rows.shape[1]} channels but earlier batches had {self._mean.numel()}")
        if rows.shape[0] == 0:
            return
        x = rows.detach().to(torch.float64)
        mean = x.mean(dim=0)
        self._merge(x.shape[0], mean, (x - mean).square().sum(dim=0))

    def _merge(self, count: int, mean: torch.Tensor, squared_deviations: torch.Tensor) -> None:
        if self._mean is None:
            self.num_tokens, self._mean, self._squared_deviations = count, mean.clone(), squared_deviations.clone()
            return
        total = self.num_tokens + count
        delta = mean.to(self._mean.device) - self._mean
        self._squared_deviations += squared_deviations.to(self._mean.device) + delta.square() * (
            self.num_tokens * count / total)
        self._mean += delta * (count / total)
        self.num_tokens = total

    @classmethod
    def combined(cls, parts: Sequence[ChannelMoments]) -> ChannelMoments:
        """The statistics of all ``parts``' tokens together (e.g. one part per process), merged in the order given."""
        merged = cls()
        for part in parts:
            if part.num_tokens:
                merged._merge(part.num_tokens, part._mean, part._squared_deviations)
        return merged

    def _checked(self) -> None:
        if self._mean is None:
            raise RuntimeError("no activations were added: call update() with at least one token first")

    @property
    def mean(self) -> torch.Tensor:
        """``[channels]`` float64: the mean of each channel over the tokens."""
        self._checked()
        return self._mean

    @property
    def variance(self) -> torch.Tensor:
        """``[channels]`` float64: the sample variance over the tokens (divided by tokens - 1, as FLAP's paper;
        0 with one token)."""
        self._checked()
        return self._squared_deviations / max(self.num_tokens - 1, 1)

    @property
    def squared_norms(self) -> torch.Tensor:
        """``[channels]`` float64: ``||X_j||_2^2``, the sum over the tokens of each channel's squares."""
        self._checked()
        return self._squared_deviations + self.num_tokens * self._mean.square()
