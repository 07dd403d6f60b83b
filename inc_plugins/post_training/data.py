"""Calibration batches for the post-training pipeline: sampling, sequence lengths, labels, model calls.

Batches are dicts of tensors as transformers models take them (``input_ids``, ``attention_mask``, ``labels``, ...),
e.g. ``inc_plugins.perf.synthetic.synthetic_token_batches`` or a ``DataLoader`` with a padding collator.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["take_samples", "slice_batch", "take_sequences", "batch_size", "token_mask", "average_sequence_length",
           "require_labels", "model_inputs", "forward_with_labels"]


def _check_batch(batch: Any, index: int) -> Mapping[str, Any]:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"calibration batch {index} is a {type(batch).__name__}; the post-training pipeline needs dict batches "
            f"as transformers models take them (input_ids, attention_mask, labels, ...)"
        )
    if not isinstance(batch.get("input_ids"), Tensor) and not isinstance(batch.get("inputs_embeds"), Tensor):
        raise ValueError(f"calibration batch {index} has no 'input_ids' (keys: {sorted(batch)})")
    return batch


def batch_size(batch: Mapping[str, Any]) -> int:
    """Number of sequences in a batch (the leading dimension of its inputs)."""
    inputs = batch["input_ids"] if isinstance(batch.get("input_ids"), Tensor) else batch["inputs_embeds"]
    return int(inputs.shape[0])


def _per_sequence(value: Any, rows: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows


def slice_batch(batch: Mapping[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Sequences ``start:stop`` of a batch: every tensor whose leading dimension is the batch size is sliced."""
    rows = batch_size(batch)
    return {key: value[start:stop] if _per_sequence(value, rows) else value for key, value in batch.items()}


def take_sequences(batch: Mapping[str, Any], rows: Tensor) -> dict[str, Any]:
    """Sequences ``rows`` (indices) of a batch: every tensor whose leading dimension is the batch size is indexed."""
    size = batch_size(batch)
    return {key: value[rows] if _per_sequence(value, size) else value for key, value in batch.items()}


def take_samples(batches: Iterable[Any], num_samples: int | None = None) -> list[dict[str, Any]]:
    """The first ``num_samples`` sequences of ``batches`` (all when None), as a list of dict batches; the last
    batch is cut to size. Raises ValueError when there are no batches or fewer sequences than asked for."""
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples must be a positive int or None (all), got {num_samples!r}")
    taken: list[dict[str, Any]] = []
    count = 0
    for index, batch in enumerate(batches):
        batch = _check_batch(batch, index)
        rows = batch_size(batch)
        if num_samples is not None and count + rows >= num_samples:
            taken.append(slice_batch(batch, 0, num_samples - count))
            count = num_samples
            break
        taken.append(dict(batch))
        count += rows
    if not taken:
        raise ValueError("the calibration dataloader yielded no batches")
    if num_samples is not None and count < num_samples:
        raise ValueError(f"num_samples={num_samples} but the calibration dataloader holds only {count} sequences")
    return taken


def token_mask(batch: Mapping[str, Any]) -> Tensor:
    """[batch, seq] bool: True at real (non-padding) tokens, from ``attention_mask`` (all True without one)."""
    mask = batch.get("attention_mask")
    inputs = batch["input_ids"] if isinstance(batch.get("input_ids"), Tensor) else batch["inputs_embeds"]
    if isinstance(mask, Tensor) and mask.dim() == 2:
        return mask.detach().cpu() != 0
    return torch.ones(inputs.shape[:2], dtype=torch.bool)


def right_padded(batch: Mapping[str, Any]) -> bool:
    """Every tensor is [batch] or [batch, seq], and the attention mask of each row is ones, then zeros."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return False
    rows, seq = mask.shape
    real = mask != 0
    if not torch.equal(real, torch.arange(seq, device=mask.device)[None] < real.sum(dim=1, keepdim=True)):
        return False
    return all(isinstance(value, Tensor) and value.shape[0] == rows and (value.dim() == 1 or value.shape[1:] == (seq,))
               for value in batch.values())


def select_rows(batch: Mapping[str, Any], rows: Tensor, length: int) -> dict[str, Any]:
    """Sequences ``rows`` of a ``right_padded`` batch, cut to their first ``length`` positions."""
    return {key: value[rows][:, :length] if value.dim() == 2 else value[rows] for key, value in batch.items()}


def rebatch_by_length(batches: Sequence[Mapping[str, Any]], flags: Sequence[Tensor]) -> tuple[list, list[Tensor]]:
    """The same sequences in batches of similar length, each padded only to its longest sequence, with their
    per-sequence ``flags`` ([batch] each) moved along. Calibration sets of sentences of varied length hold about
    as much padding as text in random batches; a computation that sums over real tokens (mask tuning) gives the
    same result on either batching, in about half the time. Batches that are not right-padded dicts of [batch] and
    [batch, seq] tensors with the same keys are returned as they are (left padding would move positions)."""
    if not batches or any(not right_padded(b) or b.keys() != batches[0].keys() for b in batches):
        return list(batches), list(flags)
    rows = [(int(length), index, row) for index, batch in enumerate(batches)
            for row, length in enumerate(batch["attention_mask"].ne(0).sum(dim=1).tolist())]
    rows.sort(key=lambda entry: entry[0])  # stable: equal lengths keep their order
    size = max(batch_size(batch) for batch in batches)
    regrouped, moved = [], []
    for start in range(0, len(rows), size):
        group = rows[start : start + size]
        length = max(1, group[-1][0])
        batch = {}
        for key, first in batches[0].items():
            values = [batches[index][key][row] for _, index, row in group]
            if first.dim() == 2:
                pad = -100 if key == "labels" else 0  # -100: the label transformers' losses ignore
                values = [torch.nn.functional.pad(v[:length], (0, max(0, length - v.shape[0])), value=pad)
                          for v in values]
            batch[key] = torch.stack(values)
        regrouped.append(batch)
        moved.append(torch.stack([flags[index][row] for _, index, row in group]))
    return regrouped, moved


def real_token_rows(tensor: Tensor, tokens: Tensor) -> Tensor:
    """[batch, seq, features] -> [selected tokens, features]: the rows where ``tokens`` [batch, seq] is True, sample
    after sample, in position order."""
    return tensor.reshape(-1, tensor.shape[-1])[tokens.flatten().to(tensor.device)]


def average_sequence_length(batches: Iterable[Mapping[str, Any]]) -> int:
    """Mean number of non-padding tokens per sequence, rounded to the nearest int (at least 1)."""
    tokens = sequences = 0
    for batch in batches:
        mask = token_mask(batch)
        tokens += int(mask.sum())
        sequences += mask.shape[0]
    if sequences == 0:
        raise ValueError("no sequences to measure the average length of")
    return max(1, round(tokens / sequences))


def require_labels(batches: list[Mapping[str, Any]], loss_func) -> None:
    """Raise ValueError when a batch has no ``labels`` and no ``loss_func`` is given: the Fisher importance is
    the gradient of the task loss, which needs labels."""
    if loss_func is not None:
        return
    for index, batch in enumerate(batches):
        if batch.get("labels") is None:
            raise ValueError(
                f"calibration batch {index} has no 'labels' (keys: {sorted(batch)}): mask_search scores heads and "
                f"neurons by gradients of the task loss, so it needs labelled batches. Add 'labels' ([batch] class ids "
                f"for sequence classification; for a causal LM, the input_ids with padding set to -100), or pass "
                f"loss_func(outputs, batch) -> scalar loss"
            )


def model_inputs(model: nn.Module, batch: Mapping[str, Any], labels: bool = False) -> dict[str, Any]:
    """``batch`` as keyword arguments of ``model``: on its device, without a key/value cache (a calibration pass
    never generates), and without ``labels`` unless asked for (a loss nobody reads is work)."""
    device = next(model.parameters()).device
    kwargs = {key: value.to(device) if isinstance(value, Tensor) else value for key, value in batch.items()
              if labels or key != "labels"}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return kwargs


def forward_with_labels(model: nn.Module, batch: Mapping[str, Any], loss_func=None) -> Tensor:
    """The scalar loss of one batch: ``loss_func(outputs, batch)`` when given, else ``outputs.loss``."""
    kwargs = model_inputs(model, batch, labels=True)
    if loss_func is not None:
        kwargs.pop("labels", None)
        outputs = model(**kwargs)
        loss = loss_func(outputs, batch)
    else:
        outputs = model(**kwargs)
        loss = getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError(
                f"{type(model).__name__} returned no loss for a batch with labels: use a model with a task head "
                f"(…ForSequenceClassification, …ForCausalLM) or pass loss_func(outputs, batch)"
            )
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError(f"the loss must be a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}")
    return loss
