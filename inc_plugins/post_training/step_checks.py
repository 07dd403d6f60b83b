"""Model-level checks of the pipeline's optional steps: rearrangement and mask tuning are kept only when they raise
the pruned model's top-1 agreement with the dense model on calibration samples.

Why: both steps optimise proxies of what the pruned model decides. Rearrangement keeps the units whose Fisher
information is largest; tuning lowers each sub-layer's reconstruction error. On one of three MiniLM fine-tunes
(``docs/results/kwon_minilm.md``, 2026-12-04) every tuned fit that was kept lowered its sub-layer's held-out error,
yet the tuned model agreed less often with the dense model's decisions and lost 0.8 points of dev accuracy against
the search alone. A check measures the decision itself: the model with the step against the model without it, on
the calibration samples, and the step is kept only when it agrees with the dense model's top-1 prediction more often
(a tie keeps the model without it: a change has to earn its place).

What is compared: the argmax of the model's ``logits`` at each sample (sequence logits [batch, classes]) or at each
real token (token logits [batch, seq, vocab]). The dense predictions are recorded by the Fisher pass, which runs the
dense model on these samples anyway (masks of exactly 1), so they cost nothing. A pruned model changes mostly the
decisions the dense model made with a small margin (top-1 minus top-2 logit), so each candidate runs only on the
``CHECK_SAMPLES`` samples of smallest dense margin (a sample's margin is its smallest over its positions): a quarter
of a forward pass of Kwon et al.'s 2048 samples per candidate, where the decisions a check compares are. Each
candidate runs as a slimmed copy of the model (the pruned model's cost; families that cannot be slimmed run masked),
and a classifier that reads one token runs its last FFN there alone (``models.first_token_heads``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from inc_plugins.models.first_token_heads import first_token_last_ffn
from inc_plugins.models.structure_masks import MaskHooks, expand_head_mask, mask_structure
from inc_plugins.models.surgery_transformers import SLIMMED_CONFIG_KEY, can_slim, slim_model
from inc_plugins.progress import progress

from .data import batch_size, model_inputs, rebatch_by_length, take_sequences, token_mask

__all__ = ["CHECK_SAMPLES", "DensePredictions", "StepCheck", "StepChecker"]

logger = logging.getLogger(__name__)

CHECK_SAMPLES = 512  # a quarter of Kwon et al.'s 2048 calibration samples


@dataclass(frozen=True)
class StepCheck:
    """One step's check: ``agreement_without`` / ``agreement_with`` of ``positions`` predictions (samples or real
    tokens of the ``samples`` least-sure calibration samples) equal the dense model's; ``kept``: the step's masks
    were kept (strictly more agreement)."""

    step: str
    samples: int
    positions: int
    agreement_without: int
    agreement_with: int
    kept: bool


def _logits(outputs: Any) -> Tensor | None:
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        logits = outputs[0]
    return logits if isinstance(logits, Tensor) and logits.dim() in (2, 3) else None


def _positions(logits: Tensor, batch: Mapping[str, Any]) -> list[Tensor]:
    """Per row of the batch, its predicted logits [positions, classes]: the row's own (sequence logits) or those
    of its real tokens in position order (token logits)."""
    logits = logits.detach().float()
    if logits.dim() == 2:
        return list(logits[:, None])
    mask = token_mask(batch).to(logits.device)
    return [row[real] for row, real in zip(logits, mask)]


class DensePredictions:
    """The dense model's top-1 prediction at every position of every calibration sample and each sample's smallest
    margin; recorded from the ``logits`` of the forward passes run inside ``recording`` and ``piece``."""

    def __init__(self, model: nn.Module, n_samples: int):
        self.model = model
        self.top1: list[Tensor | None] = [None] * n_samples
        self.margin = torch.full((n_samples,), float("inf"))
        self.no_logits = False  # a recorded forward returned no logits: nothing can be checked
        self._ids: Tensor | None = None
        self._batch: Mapping[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return not self.no_logits and all(top1 is not None for top1 in self.top1)

    @contextmanager
    def piece(self, sample_ids: Tensor, batch: Mapping[str, Any]) -> Iterator[None]:
        """The forward pass run inside this context is of samples ``sample_ids`` (the rows of ``batch``)."""
        self._ids, self._batch = sample_ids, batch
        try:
            yield
        finally:
            self._ids = self._batch = None

    @contextmanager
    def recording(self) -> Iterator[None]:
        def record(_module: nn.Module, _args: tuple, outputs: Any) -> None:
            if self._ids is None:
                return
            logits = _logits(outputs)
            if logits is None:
                self.no_logits = True
                return
            for sample, positions in zip(self._ids.tolist(), _positions(logits, self._batch)):
                top2 = positions.topk(min(2, positions.shape[-1]), dim=-1).values
                margin = top2[:, 0] - top2[:, -1]
                self.top1[sample] = positions.argmax(dim=-1).cpu()
                self.margin[sample] = float(margin.min()) if margin.numel() else float("inf")

        handle = self.model.register_forward_hook(record)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def record_dense(self, batches: Sequence[Mapping[str, Any]]) -> None:
        """Record by running the model (no masks) on ``batches``: for when no Fisher pass ran."""
        first = 0
        with self.recording(), first_token_last_ffn(self.model):
            for batch in progress(batches, desc="mask_search dense predictions", unit="batch"):
                rows = batch_size(batch)
                with self.piece(torch.arange(first, first + rows), batch):
                    self.model(**model_inputs(self.model, batch))
                first += rows


def _select(batches: Sequence[Mapping[str, Any]], sample_ids: Tensor) -> tuple[list, list[Tensor]]:
    """The samples ``sample_ids`` of ``batches`` (sample i: the i-th sequence in order) as batches grouped by
    length, with each batch's sample ids."""
    chosen, ids, first = [], [], 0
    wanted = torch.zeros(sum(batch_size(b) for b in batches), dtype=torch.bool)
    wanted[sample_ids] = True
    for batch in batches:
        rows = batch_size(batch)
        here = wanted[first : first + rows].nonzero().flatten()
        if here.numel():
            chosen.append(take_sequences(batch, here))
            ids.append(here + first)
        first += rows
    return rebatch_by_length(chosen, ids)


def _slimmed_model(model: nn.Module, unit_head_mask: Tensor, neuron_mask: Tensor) -> nn.Module | None:
    """A copy of ``model`` without the units the masks prune, the kept units' scales folded in: the masked model's
    outputs at the pruned model's cost. The copy shares every parameter slimming leaves as it is (slimming replaces
    parameters, it never writes into them), so it costs the memory of the slimmed layers. None when the model's
    family cannot be slimmed, or the model was slimmed already (its layers differ in size)."""
    if not can_slim(model) or getattr(model.config, SLIMMED_CONFIG_KEY, None) is not None:
        return None
    shared = {id(parameter): parameter for parameter in model.parameters()}
    return slim_model(copy.deepcopy(model, shared), expand_head_mask(unit_head_mask, mask_structure(model)),
                      neuron_mask)


class StepChecker:
    """Counts, for candidate masks, how many of the dense model's predictions on the ``samples`` least-sure
    calibration samples the masked model repeats; ``check`` decides a step."""

    def __init__(self, model: nn.Module, predictions: DensePredictions, batches: Sequence[Mapping[str, Any]],
                 samples: int = CHECK_SAMPLES):
        self.model, self.predictions = model, predictions
        order = torch.sort(predictions.margin, stable=True).indices
        self.sample_ids = order[: min(samples, len(order))]
        self.positions = int(sum(predictions.top1[i].numel() for i in self.sample_ids.tolist()))
        self.batches, self.ids = _select(batches, self.sample_ids)
        self._counted: list[tuple[Tensor, Tensor, int]] = []  # masks already run, and their agreement

    @torch.no_grad()
    def agreement(self, unit_head_mask: Tensor, neuron_mask: Tensor) -> int:
        """Predictions of the model under these masks equal to the dense model's."""
        for head, neuron, agree in self._counted:
            if torch.equal(head, unit_head_mask) and torch.equal(neuron, neuron_mask):
                return agree
        # The slimmed copy runs only the kept units; a family that cannot be slimmed runs masked (every unit computed)
        slimmed = _slimmed_model(self.model, unit_head_mask, neuron_mask)
        runner = slimmed if slimmed is not None else self.model
        was_training = runner.training
        runner.eval()
        agree = 0
        try:
            with MaskHooks(self.model, unit_head_mask, neuron_mask) if slimmed is None else nullcontext(), \
                    first_token_last_ffn(runner), \
                    progress(desc="mask_search step check", unit="sample", total=len(self.sample_ids)) as bar:
                for batch, ids in zip(self.batches, self.ids):
                    logits = _logits(runner(**model_inputs(runner, batch)))
                    for sample, positions in zip(ids.tolist(), _positions(logits, batch)):
                        agree += int((positions.argmax(dim=-1).cpu() == self.predictions.top1[sample]).sum())
                    bar.update(len(ids))
        finally:
            runner.train(was_training)
        self._counted.append((unit_head_mask.clone(), neuron_mask.clone(), agree))
        return agree

    def check(self, step: str, without: tuple[Tensor, Tensor], with_step: tuple[Tensor, Tensor]) -> StepCheck:
        """``without`` / ``with_step``: (unit head mask, neuron mask) of the model before and after ``step``."""
        before = self.agreement(*without)
        after = self.agreement(*with_step)
        result = StepCheck(step, len(self.sample_ids), self.positions, before, after, kept=after > before)
        logger.info("mask_search: %s %s (top-1 agreement with the dense model on the %d least-sure calibration "
                    "samples: %d -> %d of %d)", step, "kept" if result.kept else "dropped", result.samples, before,
                    after, result.positions)
        return result
