"""Misclassification rate of a classifier over labelled batches: the particle filter's error measure.

Batches are ``(inputs, labels)`` pairs or dicts with ``"labels"``; logits are the output itself, its ``.logits``
(transformers) or its first element.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from inc_plugins.finite_checks import check_tensor


def _logits(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def split_labelled_batch(batch) -> tuple[tuple, dict, Tensor]:
    """(args, kwargs, labels) of an ``(inputs, labels)`` pair or a dict batch with ``"labels"``.

    Raises ValueError for unlabelled batches.
    """
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(f"a dict batch needs 'labels' to measure misclassification; it has {sorted(batch)}")
        return (), {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor):
        return (batch[0],), {}, batch[1]
    raise ValueError(
        f"misclassification needs labelled batches: (inputs, labels) pairs or dicts with 'labels', got "
        f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


@torch.no_grad()
def misclassification_rate(model: nn.Module, batches: Iterable) -> float:
    """Fraction of examples whose argmax logit differs from the label, over all batches (model in eval mode).

    Raises NonFiniteError when the logits hold NaN or Inf (argmax would rank them silently)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wrong = total = 0
    try:
        for index, batch in enumerate(batches):
            args, kwargs, labels = split_labelled_batch(batch)
            args = tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)
            kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
            logits = _logits(model(*args, **kwargs))
            check_tensor(logits, None, "the model's output (logits)", f"misclassification rate on batch {index}")
            predictions = logits.argmax(dim=-1)
            labels = labels.to(predictions.device)
            wrong += int((predictions != labels).sum())
            total += labels.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("no labelled examples to evaluate")
    return wrong / total
