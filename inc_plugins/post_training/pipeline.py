"""The whole post-training pruning framework of Kwon et al. (2022) on one model, without retraining:

    Fisher mask gradients -> constrained mask search (FLOPs or latency; optionally FFN widths in multiples of m)
    -> mask rearrangement -> mask tuning
    (-> FLAP's bias compensation of the removed units, an option: ``bias_compensation``)

Each step is one module of this package (or of ``inc_plugins.algorithms``). Rearrangement and tuning are each kept
only when the model with the step agrees with the dense model's predictions on the calibration samples more often
than the model without it (``step_checks``; ``check_steps=False`` keeps them unchecked, as the paper does).
``prune_post_training`` returns masks (and, with compensation, bias shifts) and leaves the model's weights as they
were; ``fold_kwon_result`` writes both into the weights (``inc_plugins.models.structure_masks`` applies masks alone
with hooks: ``apply_structure_masks``).
"""

from __future__ import annotations

import logging
import time
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, ValidationError, WithJsonSchema, WrapValidator, model_validator
from torch import Tensor, nn

from inc_plugins.algorithms.fisher import diagonal_fisher
from inc_plugins.algorithms.flap import BIAS_COMPENSATION_KEY
from inc_plugins.algorithms.neuron_blocks import check_width_multiple
from inc_plugins.algorithms.rearrange import rearrange_mask
from inc_plugins.execution.distributed import rank_shard, unsharded, world_size
from inc_plugins.finite_checks import check_batch, check_parameters
from inc_plugins.models.structure_masks import (MaskStructure, UnitSlice, expand_head_mask, fold_structure_masks,
                                                mask_structure)
from inc_plugins.perf.width_choice import choose_width_multiple
from inc_plugins.plugin_settings import PluginSettings

from .bias_compensation import OutputBiasShifts, add_bias_shifts, removed_unit_bias_shifts
from .data import average_sequence_length, batch_size, require_labels, take_samples
from .flops_budget import (
    SEQ_LEN_DESCRIPTION,
    SeqLenSetting,
    flops_budget,
    masked_macs,
    search_masks_under_flops,
    unit_costs,
)
from .latency_budget import (
    as_latency_table,
    check_machine,
    current_machine,
    latency_budget,
    search_masks_under_latency_table,
    unit_latency_table,
)
from .mask_gradients import MaskGradients, collect_mask_gradients
from .mask_tuning import TuningResult, tune_mask_scales
from .step_checks import DensePredictions, StepCheck, StepChecker
from .teacher_targets import TeacherTargets

__all__ = ["CONSTRAINTS", "KwonSettings", "KwonResult", "fold_kwon_result", "prune_post_training"]

logger = logging.getLogger(__name__)

Constraint = Literal["flops", "latency"]
CONSTRAINTS = typing.get_args(Constraint)


# tables are read from files a person names; the JSON form of latency_table is such a path
_LatencyTableSetting = Annotated[Any, WithJsonSchema({"type": "string", "maxLength": 4096})]
_WIDTH_MULTIPLE_DESCRIPTION = (
    "every block keeps a multiple of this many FFN neurons (0 and the full width included), chosen inside the search "
    "(exact for 'flops'): an int >= 1 that divides the FFN width (1: any width), or 'auto': the multiple a "
    "latency_table measured at every width of a range favours (inc_plugins.perf.width_choice). Heads are not "
    "rounded: each is already head_dim (64) wide in every projection")


def _width_multiple_value(value: Any, handler) -> Any:
    """One error naming what is allowed, instead of one per member of the union."""
    try:
        return handler(value)
    except ValidationError:
        # no value in the message: the recipe's error line and pydantic's context both show it
        raise ValueError("width_multiple must be an int in [1, 65536] that divides the FFN width, or 'auto' (with a "
                         "latency_table)") from None


_WidthMultipleSetting = Annotated[Annotated[int, Field(ge=1, le=65_536)] | Literal["auto"],
                                  WrapValidator(_width_multiple_value)]


class KwonSettings(PluginSettings):
    """What to prune and how: the keys of a ``mask_search`` config entry, and the settings of
    ``prune_post_training``. ``KwonSettings(0.4, tune=False)``: the target may be given positionally."""

    target_sparsity: float = Field(description=(
        "fraction of the dense cost to REMOVE, in [0, 1): FLOPs of attention units and FFN neurons (constraint "
        "'flops') or table latency of the blocks ('latency')"))
    constraint: Constraint = Field(
        "flops", description="what target_sparsity counts: 'flops' (MACs per sequence) or 'latency' (seconds, from "
                             "latency_table)")
    seq_len: SeqLenSetting = Field(None, description=SEQ_LEN_DESCRIPTION)
    num_samples: Annotated[int, Field(ge=1, le=65_536)] | None = Field(
        None, description="calibration sequences used (the first ones); null: all that the dataloader yields")
    rearrange: bool = Field(True, description="run mask rearrangement (the paper's section 4.2)")
    tune: bool = Field(True, description="run mask tuning: least-squares scales of the kept units (section 4.3)")
    per_sample_fisher: bool = Field(
        False, description="one Fisher gradient per sequence (the paper's definition) instead of one per batch "
                           "(the reference code)")
    latency_table: _LatencyTableSetting = Field(
        None, description="the latency table for constraint 'latency' and width_multiple 'auto': a file written by "
                          "inc_plugins.latency_table (in Python also a LatencyTable or a dict with head_latency, "
                          "neuron_latency, machine)")
    latency_backend: Annotated[str, Field(max_length=100)] = Field(
        "eager", description="the inference backend the table's latencies are for, checked against its metadata")
    allow_foreign_latency_table: bool = Field(
        False, description="use a table measured on another machine with a warning instead of refusing it")
    damp: Annotated[float, Field(ge=0, le=1e6)] = Field(
        1.0, description="damping added to the least-squares normal equations of mask tuning")
    max_abs_scale: Annotated[float, Field(gt=0, le=1e6)] = Field(
        10.0, description="the largest |scale| mask tuning accepts; a sub-layer with a larger one keeps scales of 1")
    check_steps: bool = Field(
        True, description="keep rearrangement and tuning only when each raises the top-1 agreement with the dense "
                          "model on the least-sure calibration samples (false: always keep them, as the paper does)")
    # (mask_search measures the means on the model under its final masks, FLAP on the dense model)
    bias_compensation: bool = Field(False, description=BIAS_COMPENSATION_KEY)
    width_multiple: _WidthMultipleSetting = Field(1, description=_WIDTH_MULTIPLE_DESCRIPTION)

    def __init__(self, *target_sparsity: float, **settings: Any):
        if len(target_sparsity) > 1:
            raise TypeError(f"KwonSettings takes target_sparsity as its only positional argument, got "
                            f"{target_sparsity}")
        super().__init__(**dict(zip(["target_sparsity"], target_sparsity)), **settings)

    @model_validator(mode="after")
    def _reachable(self) -> KwonSettings:
        if not 0 <= self.target_sparsity < 1:
            raise ValueError(
                f"target_sparsity={self.target_sparsity!r} cannot be met: it is the fraction of head+FFN "
                f"{'FLOPs' if self.constraint != 'latency' else 'latency'} to remove and must be in [0, 1) "
                f"(1 would remove every attention head and FFN neuron)"
            )
        if self.constraint == "latency" and self.latency_table is None:
            raise ValueError("constraint 'latency' needs latency_table: a table path, or an object with "
                             "head_latency, neuron_latency and machine")
        if self.width_multiple == "auto" and self.latency_table is None:
            raise ValueError("width_multiple 'auto' needs latency_table: a table measured at every FFN width of a range "
                             "(python -m inc_plugins.latency_table measure --neuron-widths FIRST:LAST); or give an "
                             "int >= 1 that divides the FFN width")
        if self.constraint == "flops" and self.latency_table is not None and self.width_multiple != "auto":
            logger.warning("latency_table is ignored with constraint 'flops' (unless width_multiple is 'auto')")
        return self


@dataclass(frozen=True)
class KwonResult:
    """Masks and what they cost.

    ``head_mask`` [n_layers, n_heads] per query head and ``neuron_mask`` [n_layers, n_neurons]: float, 0 = pruned,
    else the unit's scale (the convention of ``structure_masks`` and ``slimming``); under grouped-query attention
    the heads of a group share one value, and ``unit_head_mask`` [n_layers, n_head_units] holds it per group.
    ``cost`` / ``budget`` / ``dense_cost``: MACs per sequence of ``seq_len`` tokens ("flops") or seconds
    ("latency") of the kept units, the allowed cost and the dense cost. ``tuning``: the tuning log (None when
    tuning did not run), also when its check dropped the tuned scales. ``step_checks``: each checked step's
    decision. ``bias_shifts``: what ``bias_compensation`` adds to the output projections' biases (None when off).
    ``phase_seconds``: where the time went (the Fisher pass is 0 when precomputed gradients were given).
    ``width_multiple``: every block kept a multiple of it of FFN neurons (the setting, 'auto' resolved).
    """

    head_mask: Tensor
    neuron_mask: Tensor
    unit_head_mask: Tensor
    structure: MaskStructure
    constraint: str
    cost: float
    budget: float
    dense_cost: float
    seq_len: int | None
    gradients: MaskGradients
    tuning: TuningResult | None
    step_checks: tuple[StepCheck, ...]
    bias_shifts: OutputBiasShifts | None
    phase_seconds: dict[str, float]  # wall time of "fisher", "search", "rearrange", "tune", "check", "compensate"
    width_multiple: int


def _latency_table(settings: KwonSettings):
    table = as_latency_table(settings.latency_table)
    check_machine(table, current_machine(settings.latency_backend), settings.allow_foreign_latency_table)
    return table


def _width_multiple(settings: KwonSettings, structure: MaskStructure, table) -> int:
    """The FFN width multiple to search with: the setting, or for 'auto' the one ``table`` favours."""
    if settings.width_multiple != "auto":
        check_width_multiple(settings.width_multiple, structure.n_neurons)
        return settings.width_multiple
    choice = choose_width_multiple(unit_latency_table(structure, table))
    logger.info("mask_search: width_multiple 'auto' chose %d (mean latency over the fitted line at each multiple: "
                "%s)", choice.multiple, {m: round(score, 4) for m, score in choice.scores.items()})
    return choice.multiple


def _check_gradients(gradients: MaskGradients, structure: MaskStructure, settings: KwonSettings) -> None:
    expected = {"head": (structure.n_layers, structure.n_head_units), "neuron": (structure.n_layers, structure.n_neurons)}
    for name, shape in expected.items():
        tensor = getattr(gradients, name)
        if tensor.dim() != 3 or tuple(tensor.shape[1:]) != shape:
            raise ValueError(f"precomputed {name} gradients must be [n_vectors, {shape[0]}, {shape[1]}] for this model, "
                             f"got {list(tensor.shape)}")
    if gradients.per_sample != settings.per_sample_fisher:
        raise ValueError(f"precomputed gradients have per_sample={gradients.per_sample}, the settings ask for "
                         f"per_sample_fisher={settings.per_sample_fisher}")


def _fisher_gradients(model: nn.Module, samples: list, loss_func, per_sample: bool, structure: MaskStructure,
                      recorders: list) -> MaskGradients:
    """The Fisher pass, filling ``recorders`` on the way with one process only (a rank sees a share of the samples,
    so the dense predictions are recorded later, on all of them). Under torch.distributed each rank runs its
    ``rank_shard`` of the batches and the gradient vectors are gathered back into one process's order: each vector
    depends on its own batch alone, so every rank holds one process's gradients, and the search, rearrangement,
    tuning and checks after them run alike on every rank (each on all the samples)."""
    if world_size() == 1:
        return collect_mask_gradients(model, samples, loss_func, per_sample, structure, recorders)
    share = rank_shard(samples)
    pieces = []
    if share:
        local = collect_mask_gradients(model, share, loss_func, per_sample, structure)
        counts = [batch_size(batch) if per_sample else 1 for batch in share]
        pieces = list(zip(local.head.split(counts), local.neuron.split(counts)))
    ordered = unsharded(pieces)
    return MaskGradients(torch.cat([head for head, _ in ordered]), torch.cat([neuron for _, neuron in ordered]),
                         per_sample)


def _step_checker(model: nn.Module, predictions: DensePredictions | None, samples,
                  phase_seconds: dict) -> StepChecker | None:
    """The checker of the optional steps, the dense predictions recorded first when no Fisher pass ran; None when
    the steps are not checked or the model's outputs have no logits to compare."""
    if predictions is None:
        return None
    start = time.perf_counter()
    if not predictions.complete and not predictions.no_logits:
        predictions.record_dense(samples)
    phase_seconds["check"] += time.perf_counter() - start
    if predictions.no_logits:
        logger.warning("mask_search: the model's outputs have no logits, so rearrangement and tuning are kept "
                       "unchecked")
        return None
    return StepChecker(model, predictions, samples)


def prune_post_training(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    settings: KwonSettings,
    loss_func=None,
    gradients: MaskGradients | None = None,
) -> KwonResult:
    """Run Fisher -> search -> rearrange -> tune on ``model`` (weights untouched) and return the masks.

    ``batches``: labelled dict batches (``labels`` for ``outputs.loss``), or any dict batches with
    ``loss_func(outputs, batch) -> scalar``. ``gradients``: mask gradients that ``collect_mask_gradients`` already
    computed on these same samples (they depend on neither the target nor the other switches, so one pass can serve
    several searches); None computes them here. Under torch.distributed each rank passes its ``rank_shard`` of the
    batches and gets one process's result (``_fisher_gradients``). Raises UnsupportedModelError for families without head/neuron masks,
    ValueError for batches without labels, a target that cannot be met, or a bad latency table
    (``LatencyTableMismatchError`` when it comes from another machine); NonFiniteError naming the layer or batch
    when a parameter, a calibration input, a loss or a mask gradient holds NaN or Inf.
    """
    structure = mask_structure(model)
    samples = take_samples(unsharded(list(batches)) if world_size() > 1 else batches, settings.num_samples)
    require_labels(samples, loss_func)
    check_parameters(model, "mask_search")
    for index, batch in enumerate(samples):
        check_batch(batch, index, "mask_search")
    reads_table = settings.constraint == "latency" or settings.width_multiple == "auto"
    table = unit_latency_table(structure, _latency_table(settings)) if reads_table else None
    multiple = _width_multiple(settings, structure, table)

    if settings.constraint == "flops":
        seq_len = settings.seq_len or average_sequence_length(samples)
        costs = unit_costs(structure, seq_len)
        budget, dense = flops_budget(costs, settings.target_sparsity), float(costs.dense)
    else:
        seq_len = settings.seq_len
        budget, dense = latency_budget(structure, table, settings.target_sparsity)

    phase_seconds = dict.fromkeys(("fisher", "search", "rearrange", "tune", "check", "compensate"), 0.0)
    start = time.perf_counter()
    # the Fisher pass runs the dense model on the calibration samples: it records, on the way, tuning's targets and
    # the dense predictions the step checks compare with (across processes, where each rank runs a share of the
    # samples, tuning and the checks compute them on all of them)
    teacher = TeacherTargets(model, structure, samples) if (
        gradients is None and settings.tune and world_size() == 1 and TeacherTargets.fits(structure, samples)) else None
    predictions = DensePredictions(model, sum(batch_size(batch) for batch in samples)) if (
        settings.check_steps and (settings.rearrange or settings.tune)) else None
    if gradients is None:
        recorders = [recorder for recorder in (teacher, predictions) if recorder is not None]
        gradients = _fisher_gradients(model, samples, loss_func, settings.per_sample_fisher, structure, recorders)
        phase_seconds["fisher"] = time.perf_counter() - start
    else:
        _check_gradients(gradients, structure, settings)
    start = time.perf_counter()
    head_importance, neuron_importance = diagonal_fisher(gradients.head), diagonal_fisher(gradients.neuron)
    if settings.constraint == "flops":
        unit_keep, neuron_keep = search_masks_under_flops(structure, head_importance, neuron_importance, budget, costs,
                                                          multiple)
        cost = float(masked_macs(structure, unit_keep, neuron_keep, seq_len))
    else:
        unit_keep, neuron_keep = search_masks_under_latency_table(head_importance, neuron_importance, budget, table,
                                                                  multiple)
        cost = float(table.head_latency[unit_keep.sum(dim=1)].sum() + table.neuron_latency[neuron_keep.sum(dim=1)].sum())
    phase_seconds["search"] = time.perf_counter() - start
    logger.info(
        "mask_search: kept %d/%d attention units and %d/%d neurons; cost %.4g of budget %.4g (dense %.4g)",
        int(unit_keep.sum()), unit_keep.numel(), int(neuron_keep.sum()), neuron_keep.numel(), cost, budget, dense,
    )
    masks = (unit_keep.float(), neuron_keep.float())
    checker = _step_checker(model, predictions, samples, phase_seconds)
    checks: list[StepCheck] = []

    def decide(step: str, before: tuple[Tensor, Tensor], after: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The masks to go on with: ``after`` the step, unless its check drops it (a step that changed nothing is
        not checked)."""
        if checker is None or all(torch.equal(a, b) for a, b in zip(before, after)):
            return after
        start = time.perf_counter()
        checks.append(checker.check(step, before, after))
        phase_seconds["check"] += time.perf_counter() - start
        return after if checks[-1].kept else before

    if settings.rearrange:
        start = time.perf_counter()
        rearranged = (rearrange_mask(unit_keep, gradients.head).float(),
                      rearrange_mask(neuron_keep, gradients.neuron).float())
        phase_seconds["rearrange"] = time.perf_counter() - start
        masks = decide("rearrangement", masks, rearranged)

    tuning = None
    if settings.tune:
        start = time.perf_counter()
        tuning = tune_mask_scales(
            model, masks[0], masks[1], samples,
            damp=settings.damp, max_abs_scale=settings.max_abs_scale, structure=structure, teacher_targets=teacher,
        )
        phase_seconds["tune"] = time.perf_counter() - start
        for rejected in tuning.rejected:
            logger.info("mask tuning: block %d %s keeps scales of 1 (%s)", rejected.layer, rejected.part,
                        rejected.reason)
        masks = decide("tuning", masks, (tuning.unit_head_mask, tuning.neuron_mask))
    unit_head_mask, neuron_mask = masks
    shifts = None
    if settings.bias_compensation:  # after the masks are final: the means of the model that will be shipped
        start = time.perf_counter()
        shifts = removed_unit_bias_shifts(model, samples, unit_head_mask, neuron_mask)
        phase_seconds["compensate"] = time.perf_counter() - start
    return KwonResult(
        head_mask=expand_head_mask(unit_head_mask, structure).clone(),
        neuron_mask=neuron_mask,
        unit_head_mask=unit_head_mask,
        structure=structure,
        constraint=settings.constraint,
        cost=cost,
        budget=float(budget),
        dense_cost=dense,
        seq_len=seq_len,
        gradients=gradients,
        tuning=tuning,
        step_checks=tuple(checks),
        bias_shifts=shifts,
        phase_seconds={phase: round(seconds, 3) for phase, seconds in phase_seconds.items()},
        width_multiple=multiple,
    )


@torch.no_grad()
def fold_kwon_result(model: nn.Module, result: KwonResult) -> list[UnitSlice]:
    """Write ``result`` into ``model``'s weights, in place: the masks (pruned rows and columns zero, tuned scales in
    the output projections' columns: ``fold_structure_masks``, whose slices it returns), then the bias shifts, if
    any (``add_bias_shifts``)."""
    slices = fold_structure_masks(model, result.head_mask, result.neuron_mask)
    if result.bias_shifts is not None:
        add_bias_shifts(model, result.bias_shifts)
    return slices
