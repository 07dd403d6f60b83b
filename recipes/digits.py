"""scikit-learn's digits (1,797 8x8 grey images of the digits 0-9, shipped inside the package: no download), split
into train / validation / test sets by a seeded, class-stratified shuffle.

Pixels are scaled from 0..16 to [0, 1] and shaped [N, 1, 8, 8] (the MLP flattens them itself). The validation set
is carved from the training part: pruners that score masks on data (APoZ calibration, the particle filter's
misclassification rate) read it, and the test set is only used to report accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


@dataclass(frozen=True)
class DigitsSplit:
    """Images [N, 1, 8, 8] float32 in [0, 1] and labels [N] int64 of each part."""

    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor
    val_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    seed: int

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_labels), "val": len(self.val_labels), "test": len(self.test_labels)}


def _check_fraction(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")


def _stratified_order(labels: Tensor, fractions: tuple[float, float], generator: torch.Generator):
    """Index tensors (first, second, rest): each class contributes ``round(fraction * class size)`` to the first
    two parts, chosen by a seeded shuffle within the class."""
    parts = ([], [], [])
    for label in range(int(labels.max()) + 1):
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        first = round(fractions[0] * len(members))
        second = round(fractions[1] * len(members))
        parts[0].append(members[:first])
        parts[1].append(members[first:first + second])
        parts[2].append(members[first + second:])
    return tuple(torch.cat(part).sort().values for part in parts)


def load_digits_split(seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.1) -> DigitsSplit:
    """The digits split into test (``test_fraction`` of every class), validation (``val_fraction``) and train (the
    rest). The same seed always gives the same split."""
    from sklearn.datasets import load_digits

    _check_fraction(test_fraction, "test_fraction")
    _check_fraction(val_fraction, "val_fraction")
    if test_fraction + val_fraction >= 1:
        raise ValueError(
            f"test_fraction {test_fraction} + val_fraction {val_fraction} leave no training images: keep their sum < 1"
        )
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    test, val, train = _stratified_order(labels, (test_fraction, val_fraction), generator)
    return DigitsSplit(images[train], labels[train], images[val], labels[val], images[test], labels[test], seed)


def labelled_batches(images: Tensor, labels: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """(images, labels) pairs in order: the batches INC's one-shot pruners and the evaluation read."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(labels), batch_size)]
