"""Gradients of the task loss with respect to head and neuron masks at m = 1 (Kwon et al. 2022, section 4.1).

Mask variables (one per attention unit: a head, or a key/value group under grouped-query attention; one per FFN
neuron) are hooked into the model at 1.0, so the model computes what the dense model computes, and each batch's
loss is back-propagated to them. The model's parameters get no gradients (they are frozen for the pass).

Per batch or per sample: the paper's empirical Fisher sums squared *per-sample* gradients. The reference code uses
one gradient per mini-batch (of the batch's mean loss), which is what ``per_sample=False`` (the default) does.
``per_sample=True`` runs every sequence alone (batch size 1): the paper's definition, ``batch_size`` times the
forward/backward passes. The two rank units differently in general; see ``inc_plugins.algorithms.fisher``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from inc_plugins.algorithms.fisher import FisherAccumulator
from inc_plugins.finite_checks import check_tensor
from inc_plugins.models.architectures import adapter_for
from inc_plugins.models.first_token_heads import first_token_last_ffn
from inc_plugins.models.structure_masks import MaskStructure, apply_structure_masks, mask_structure
from inc_plugins.progress import progress

from .data import batch_size, forward_with_labels, require_labels, right_padded, select_rows, slice_batch, token_mask

__all__ = ["MaskGradients", "collect_mask_gradients"]


@dataclass(frozen=True)
class MaskGradients:
    """``head``: [n_vectors, n_layers, n_head_units]; ``neuron``: [n_vectors, n_layers, n_neurons]; float32.

    One vector per batch, or per sequence when ``per_sample``. Units: loss per unit of mask.
    """

    head: torch.Tensor
    neuron: torch.Tensor
    per_sample: bool


@contextmanager
def _frozen_eval(model: nn.Module):
    """Eval mode (no dropout) and no parameter gradients, restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(was_training)


# Sequences per forward pass when a batch is split by length. Random batches of sentences are padded to their
# longest, about half of them padding on a sentence task; sorted groups of 8 are padded to theirs.
LENGTH_GROUP = 8


def _gradient_parts(batch: Mapping[str, Any], per_sample: bool,
                    loss_func) -> list[list[tuple[float, torch.Tensor, Mapping]]]:
    """For each gradient vector the batch gives (one, or one per sequence), the (weight, rows, piece) forward passes
    whose weighted gradients add up to it; ``rows`` are the batch's rows the piece holds.

    A sequence-classification batch scored by the model's own loss (the mean over its sequences) runs as
    length-sorted groups of LENGTH_GROUP, each cut to its longest sequence and weighted by its share of the
    sequences: the same gradient, up to rounding, with far less padding. A single sequence is cut to its length.
    Anything else (a ``loss_func``, token labels, left padding) runs as given."""
    every_row = torch.arange(batch_size(batch))
    if not right_padded(batch):
        if per_sample:
            return [[(1.0, every_row[row : row + 1], slice_batch(batch, row, row + 1))] for row in every_row.tolist()]
        return [[(1.0, every_row, batch)]]
    lengths = token_mask(batch).sum(dim=1)
    if per_sample:
        return [[(1.0, every_row[row : row + 1], select_rows(batch, every_row[row : row + 1], max(1, int(lengths[row]))))]
                for row in every_row.tolist()]
    labels = batch.get("labels")
    if loss_func is not None or not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        return [[(1.0, every_row, batch)]]
    order = torch.sort(lengths, stable=True).indices
    groups = [order[start : start + LENGTH_GROUP] for start in range(0, len(order), LENGTH_GROUP)]
    return [[(len(rows) / len(order), rows, select_rows(batch, rows, max(1, int(lengths[rows].max()))))
             for rows in groups]]


_LOSS_HINT = "check the model file, the calibration data and its labels"


def _check_gradient(grad: torch.Tensor, block_names: list[str], kind: str, during: str) -> None:
    """The first block whose row of ``grad`` ([n_layers, n_units]) holds NaN or Inf is named."""
    if bool(torch.isfinite(grad).all()):
        return
    for name, row in zip(block_names, grad):
        check_tensor(row, name, kind, during, _LOSS_HINT)


def collect_mask_gradients(
    model: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    loss_func=None,
    per_sample: bool = False,
    structure: MaskStructure | None = None,
    recorders: Sequence[Any] = (),
) -> MaskGradients:
    """Gradient of each batch's (or sequence's) loss w.r.t. every mask variable, at masks of 1.

    ``batches``: dict batches with ``labels`` (or any batches ``loss_func(outputs, batch)`` can score).
    ``recorders``: what the dense model's forward passes fill on the way, each with ``recording()`` and
    ``piece(sample_ids, batch)`` contexts: mask tuning's targets (``teacher_targets.TeacherTargets``), the dense
    predictions of the step checks (``step_checks.DensePredictions``).
    Raises ValueError when a batch has no labels and no ``loss_func`` is given; NonFiniteError naming the batch
    when a loss is not finite, or the block when a gradient is not.
    """
    structure = structure or mask_structure(model)
    require_labels(list(batches), loss_func)
    device = next(model.parameters()).device
    head_mask = torch.ones(structure.n_layers, structure.n_head_units, device=device, requires_grad=True)
    neuron_mask = torch.ones(structure.n_layers, structure.n_neurons, device=device, requires_grad=True)
    heads, neurons = FisherAccumulator(), FisherAccumulator()
    prefix, blocks = adapter_for(model).blocks(model)
    block_names = [f"{prefix}.{index}" for index in range(len(blocks))]
    samples = progress(desc="mask_search Fisher pass", unit="sample", total=sum(batch_size(b) for b in batches))
    first_sample = 0
    # the loss reads the logits only: a classifier that reads one token needs its last FFN there alone
    with _frozen_eval(model), apply_structure_masks(model, head_mask, neuron_mask), first_token_last_ffn(model), \
            samples, ExitStack() as recording:
        for recorder in recorders:
            recording.enter_context(recorder.recording())
        for index, batch in enumerate(batches):
            for row, parts in enumerate(_gradient_parts(batch, per_sample, loss_func)):
                during = f"mask_search Fisher gradients, batch {index}" + (f", sequence {row}" if per_sample else "")
                head_grad, neuron_grad = torch.zeros_like(head_mask), torch.zeros_like(neuron_mask)
                for weight, rows, piece in parts:
                    with ExitStack() as pieces:
                        for recorder in recorders:
                            pieces.enter_context(recorder.piece(first_sample + rows, piece))
                        loss = forward_with_labels(model, piece, loss_func)
                    check_tensor(loss.detach(), None, "the loss", during, _LOSS_HINT)
                    head_part, neuron_part = torch.autograd.grad(loss * weight, (head_mask, neuron_mask),
                                                                 allow_unused=True)
                    if head_part is not None:
                        head_grad += head_part
                    if neuron_part is not None:
                        neuron_grad += neuron_part
                _check_gradient(head_grad, block_names, "attention-unit mask gradient", during)
                _check_gradient(neuron_grad, block_names, "FFN-neuron mask gradient", during)
                heads.add(head_grad)
                neurons.add(neuron_grad)
            samples.update(batch_size(batch))
            first_sample += batch_size(batch)
    return MaskGradients(heads.grads(), neurons.grads(), per_sample)
