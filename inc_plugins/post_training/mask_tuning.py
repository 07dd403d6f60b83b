"""Layer-wise mask tuning on a model (Kwon et al. 2022, section 4.3; reference ``prune/rescale.py``).

The pruned model (the *student*: the model under the searched masks) is fitted to a *teacher* (by default the dense
model; ``teacher_*_mask`` may name a masked one, as the reference code does with a less pruned mask) one block
after another. In block l:

1. Attention. The student's attention sub-layer output before its normalisation is
   ``sum_u s_u * A_u + bias + residual`` where ``A_u`` is kept unit u's context times its columns of the attention
   output projection (a unit is a head, or a key/value group of heads). The target is the teacher's same sum minus
   the bias and minus the *student's* residual (its block input), so the fit also corrects the drift that earlier
   pruned blocks left in the residual stream. ``s`` solves damped least squares
   (``algorithms.mask_tuning.solve_mask_scales``) over every non-padding token.
2. FFN, the same way, with the student's attention already tuned: ``A_n`` is neuron n's activation times its
   column of ``ffn_out``. For a sequence classifier's last block only the first token (what the pooler / classifier
   reads) is fitted, as in the reference.
   Neither fit builds A: its normal equations follow from the kept features' ``X^T X`` and the weight's ``W^T W``
   (``KeptUnitEquations``; for the FFN, ``A A^T = (W^T W) * (H^T H)`` with H the kept activations).
3. Both streams advance through the block (teacher: teacher masks; student: the tuned masks), so block l+1 is fitted
   on the inputs the tuned earlier blocks produce.

Cost: the teacher and the FFN fit run the whole block; the attention fit stops the block once the attention output
projection's input is recorded (the FFN would be wasted work). The student's passes run a slimmed copy of the block
(``surgery_transformers.slim_block``: only the kept heads and neurons, their current scales folded into the output
projections), so they cost what the pruned block costs; the fits see the same contributions (kept features times
scaled weight columns instead of scaled features times weight columns). A block that keeps no head or no neuron,
and a family that cannot be slimmed, runs the masked block. The block output is the FFN residual plus the FFN
output (pre-norm), or the block's last LayerNorm of that sum (post-norm), so the student's next input is computed
from the FFN fit's recorded activations with the tuned scales (one output-projection matmul) instead of a fourth
pass. The calibration sequences are regrouped by length first (``data.rebatch_by_length``): every fit sums over
real tokens, so the grouping does not change it, and random batches of sentences are about half padding.

Residuals: the attention residual is the block input in every supported family. The FFN residual is the FFN's
input in post-norm (bert-like) blocks and block input + attention output in pre-norm (llama-like) blocks.

Each sub-layer decides for itself (``algorithms.mask_tuning.choose_mask_scales``): every ``HELDOUT_EVERY``-th
calibration sample is held out of the fit, and the solved scales are kept only when they stay within the safeguards
(LSMR converged, every |scale| <= ``max_abs_scale``) and lower the sub-layer's reconstruction error on the held-out
samples. Otherwise that sub-layer keeps its current scales and tuning goes on with the next one, whose inputs are
what the kept decision produces. The reference instead stops at the first rejected fit and leaves every later
block untuned, so one ill-posed fit early in the model cost the rest of it its tuning. The reference also skips
the attention of block 0; this follows the paper and tunes it, and it does not add the reference's extra constant
column to the attention fit.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from inc_plugins.algorithms.mask_tuning import ScaleSolution, choose_mask_scales
from inc_plugins.execution.calibration import BlockInput, capture_block_inputs, first_output
from inc_plugins.models.architectures import UnsupportedModelError, adapter_for
from inc_plugins.models.structure_masks import (MaskHooks, MaskStructure, expand_head_mask, group_head_mask,
                                                mask_structure)
from inc_plugins.models.surgery_transformers import slim_block, slimming_adapter
from inc_plugins.progress import progress

from .data import real_token_rows, rebatch_by_length, token_mask
from .teacher_targets import TeacherTargets

__all__ = ["KeptUnitEquations", "LayerTuning", "TuningResult", "tune_mask_scales", "unit_normal_equations"]

# 1 calibration sample in 8 is held out of every fit to judge it (256 of Kwon et al.'s 2048); with fewer than
# HELDOUT_EVERY samples nothing is held out and the safeguards alone decide.
HELDOUT_EVERY = 8


@dataclass(frozen=True)
class LayerTuning:
    """One sub-layer's fit and its decision: ``part`` is "attention" or "ffn"; ``accepted``: the tuned scales were
    kept; ``reason`` says why not; ``heldout_error_*``: relative reconstruction errors on the held-out samples
    before and with the solved scales (None when not measured)."""

    layer: int
    part: str
    n_kept: int
    accepted: bool
    reason: str = ""
    heldout_error_untuned: float | None = None
    heldout_error_tuned: float | None = None


@dataclass(frozen=True)
class TuningResult:
    """Tuned float masks (0 = pruned, else the unit's scale): ``unit_head_mask`` [n_layers, n_head_units],
    ``neuron_mask`` [n_layers, n_neurons]; ``log`` has one entry per sub-layer with kept units, in order;
    ``heldout_samples``: how many calibration samples judged the fits (0: the safeguards alone decided)."""

    unit_head_mask: Tensor
    neuron_mask: Tensor
    log: list[LayerTuning]
    heldout_samples: int

    @property
    def rejected(self) -> list[LayerTuning]:
        return [entry for entry in self.log if not entry.accepted]


class _FitEquations:
    """One sub-layer's normal equations, summed over batches: on the fitted tokens, and on the held-out tokens
    with the held-out target's squared norm."""

    def __init__(self, heldout: bool):
        self.fit: tuple = (0, 0)
        self.heldout: tuple | None = (0, 0, 0.0) if heldout else None

    def add(self, equations, rows: Tensor, target: Tensor, fit_tokens: Tensor, heldout_tokens: Tensor) -> None:
        """``equations(rows, target)`` -> (gram, rhs) of the selected tokens; ``rows`` [batch, seq, features] and
        ``target`` [batch, seq, hidden] of one batch; ``*_tokens`` [batch, seq] booleans."""
        gram, rhs = equations(real_token_rows(rows, fit_tokens), real_token_rows(target, fit_tokens))
        self.fit = (self.fit[0] + gram, self.fit[1] + rhs)
        if self.heldout is not None and heldout_tokens.any():
            held_target = real_token_rows(target, heldout_tokens)
            gram, rhs = equations(real_token_rows(rows, heldout_tokens), held_target)
            self.heldout = (self.heldout[0] + gram, self.heldout[1] + rhs,
                            self.heldout[2] + float(held_target.double().square().sum()))

    def solve(self, damp: float, max_abs_scale: float) -> ScaleSolution:
        return choose_mask_scales(self.fit, self.heldout, damp=damp, max_abs_scale=max_abs_scale)


def _sample_ids(batches: Sequence[Mapping[str, Any]]) -> list[Tensor]:
    """Per batch, [batch] indices of its samples: sample i is the i-th sequence of ``batches`` in order."""
    ids, start = [], 0
    for batch in batches:
        rows = token_mask(batch).shape[0]
        ids.append(torch.arange(start, start + rows))
        start += rows
    return ids


def _held_out(ids: Tensor, total: int) -> Tensor:
    """[batch] booleans: every HELDOUT_EVERY-th sample is held out (none when there are fewer samples)."""
    return (ids % HELDOUT_EVERY == HELDOUT_EVERY - 1) & (total >= HELDOUT_EVERY)


def _log_entry(layer: int, part: str, n_kept: int, solution: ScaleSolution) -> LayerTuning:
    return LayerTuning(layer, part, n_kept, solution.accepted, solution.reason, solution.heldout_error_untuned,
                       solution.heldout_error_tuned)


def _product_dtype(activations: Tensor) -> torch.dtype:
    """One batch's products run in the activations' precision, at least float32 (float64 ones stay float64), and
    are summed over batches in float64: float64 products cost twice the time for a change far below the fits'
    sensitivity to which calibration samples were drawn."""
    return torch.float64 if activations.dtype == torch.float64 else torch.float32


class KeptUnitEquations:
    """Normal equations (gram [n_kept, n_kept], rhs [n_kept], float64) of one sub-layer's fit, batch by batch,
    without building the contributions A.

    The sub-layer's output projection (``weight`` [hidden, n_units * unit_width]) reads unit u's features
    ``u*unit_width : (u+1)*unit_width`` (a head's context, or one FFN neuron's activation: unit_width 1). With X the
    kept features of the tokens [tokens, kept features] and W their columns, unit u's contribution at token t is
    ``X_u[t] W_u^T``, so

        gram[u, v] = sum over i in u, j in v of (W^T W)[i, j] * (X^T X)[i, j]
        rhs[u]     = sum over i in u of the column sums of X * (b W)

    ``W^T W`` is the same for every batch and is formed once, here. Cost per batch: one [features x features] product
    of the kept features, where the explicit contributions cost ``n_kept`` times the output size per token.
    """

    def __init__(self, weight: Tensor, kept_units: Tensor, unit_width: int, dtype: torch.dtype):
        self.n_kept, self.unit_width = kept_units.numel(), unit_width
        self.columns = (kept_units[:, None] * unit_width + torch.arange(unit_width, device=kept_units.device)).flatten()
        self.weight = weight[:, self.columns].to(dtype)
        self.weight_gram = (self.weight.T @ self.weight).double()

    def __call__(self, inputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``inputs``: [tokens, n_units * unit_width], the output projection's input; ``target``: [tokens, hidden]."""
        x = inputs[:, self.columns].to(self.weight.dtype)
        n, width = self.n_kept, self.unit_width
        gram = (self.weight_gram * (x.T @ x).double()).view(n, width, n, width).sum(dim=(1, 3))
        rhs = ((target.to(self.weight.dtype) @ self.weight) * x).sum(dim=0).double().view(n, width).sum(dim=1)
        return gram, rhs


def unit_normal_equations(inputs: Tensor, weight: Tensor, kept_units: Tensor, target: Tensor,
                          unit_width: int = 1) -> tuple[Tensor, Tensor]:
    """``KeptUnitEquations`` of one batch: equal to ``algorithms.mask_tuning.normal_equations`` of the explicit
    contributions (unit u's ``inputs[:, u's features] @ weight[:, u's features].T``, flattened)."""
    return KeptUnitEquations(weight, kept_units, unit_width, _product_dtype(inputs))(inputs, target)


def _can_slim(model: nn.Module) -> bool:
    try:
        slimming_adapter(model)
    except UnsupportedModelError:
        return False
    return True


def _slimmed_copy(block: nn.Module, adapter, structure: MaskStructure, head: Tensor, neuron: Tensor,
                  layer: int) -> nn.Module:
    """A copy of block ``layer`` that computes only its kept units, their current scales folded into the output
    projections (``head`` [n_layers, n_head_units], ``neuron`` [n_layers, n_neurons], 0 = pruned): the masked
    block's outputs at the pruned block's cost. Its output projections' inputs are the kept units' features,
    unscaled, and their weights carry the scales, so the fits' contributions (features times weight columns) are
    the masked block's. The copy drops the original's hooks (``MaskHooks`` would mask it twice)."""
    copy_ = copy.deepcopy(block)
    for module in copy_.modules():
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    head_scales, neuron_scales = expand_head_mask(head, structure)[layer], neuron[layer]
    heads, neurons = head_scales.nonzero().flatten(), neuron_scales.nonzero().flatten()
    return slim_block(copy_, adapter, heads.tolist(), neurons.tolist(), num_heads=structure.n_heads,
                      num_kv_heads=structure.n_kv_heads, head_dim=structure.head_dim,
                      head_scales=head_scales[heads], neuron_scales=neuron_scales[neurons])


class _StopBlock(Exception):
    """Raised by a hook once a pass has recorded what it needs: the rest of the block need not run."""


@contextmanager
def _stopping_after(module: nn.Module):
    def stop(_module: nn.Module, _args: tuple, _output: Any) -> None:
        raise _StopBlock

    handle = module.register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _recording(module: nn.Module, what: str):
    """Records ``module``'s first input (``what="input"``, after any earlier pre-hook) or its output."""
    records: list[Tensor] = []

    def record_input(_module: nn.Module, args: tuple) -> None:
        records.append(args[0].detach())

    def record_output(_module: nn.Module, _args: tuple, output: Any) -> None:
        records.append(first_output(output).detach())

    if what == "input":
        handle = module.register_forward_pre_hook(record_input)
    else:
        handle = module.register_forward_hook(record_output)
    try:
        yield records
    finally:
        handle.remove()


def _run(block: nn.Module, block_input: BlockInput) -> Tensor:
    return first_output(block(block_input.hidden_states, *block_input.args, **block_input.kwargs))


def _first_tokens(tokens: Tensor) -> Tensor:
    first = torch.zeros_like(tokens)
    first[:, 0] = True
    return first


def _default_first_token_only(model: nn.Module, structure: MaskStructure) -> bool:
    return structure.family == "bert-like" and type(model).__name__.endswith("ForSequenceClassification")


@torch.no_grad()
def tune_mask_scales(
    model: nn.Module,
    unit_head_mask: Tensor,
    neuron_mask: Tensor,
    batches: Sequence[Mapping[str, Any]],
    *,
    teacher_head_mask: Tensor | None = None,
    teacher_neuron_mask: Tensor | None = None,
    damp: float = 1.0,
    max_abs_scale: float = 10.0,
    first_token_only_last_ffn: bool | None = None,
    structure: MaskStructure | None = None,
    teacher_targets: TeacherTargets | None = None,
) -> TuningResult:
    """Tune the kept units' scales of ``unit_head_mask`` [n_layers, n_head_units] (per query head is accepted too)
    and ``neuron_mask`` [n_layers, n_neurons] block by block; see the module docstring. The model is unchanged.

    ``batches``: dict batches (labels are not used). ``damp``/``max_abs_scale``: see ``solve_mask_scales``.
    ``first_token_only_last_ffn``: fit only the first token in the last block's FFN; None = yes for bert-like
    sequence classifiers. ``teacher_targets``: the dense teacher's targets, recorded on these batches by the Fisher
    pass (``teacher_targets.TeacherTargets``): the teacher passes are skipped. Not with teacher masks.
    """
    if teacher_targets is not None and (teacher_head_mask is not None or teacher_neuron_mask is not None):
        raise ValueError("recorded teacher targets are the dense model's: give them without teacher masks")
    structure = structure or mask_structure(model)
    adapter = adapter_for(model)
    layout = adapter.layout
    _, blocks = adapter.blocks(model)
    device = next(model.parameters()).device
    head = group_head_mask(unit_head_mask, structure).detach().to(device, torch.float32).clone()
    neuron = neuron_mask.detach().to(device, torch.float32).clone()
    if tuple(neuron.shape) != (structure.n_layers, structure.n_neurons):
        raise ValueError(f"neuron_mask must be [{structure.n_layers}, {structure.n_neurons}], got {tuple(neuron.shape)}")
    first_token_only = (
        _default_first_token_only(model, structure) if first_token_only_last_ffn is None else first_token_only_last_ffn
    )
    unit_width = structure.heads_per_unit * structure.head_dim
    slimmable = _can_slim(model)
    ids = _sample_ids(batches)
    total = sum(len(batch_ids) for batch_ids in ids)
    batches, ids = rebatch_by_length(batches, ids)
    held = [_held_out(batch_ids, total) for batch_ids in ids]
    tokens = [token_mask(batch) for batch in batches]
    heldout_samples = int(sum(int(h.sum()) for h in held))
    fit_tokens = [mask & ~h[:, None].to(mask.device) for mask, h in zip(tokens, held)]
    heldout_tokens = [mask & h[:, None].to(mask.device) for mask, h in zip(tokens, held)]
    log: list[LayerTuning] = []

    was_training = model.training
    model.eval()
    try:
        with MaskHooks(model) as hooks:
            teacher_inputs = capture_block_inputs(model, blocks, batches)
            student_inputs = [BlockInput(x.hidden_states.clone(), x.args, x.kwargs) for x in teacher_inputs]
            if teacher_targets is not None:
                teacher_inputs = []  # not needed: the recorded targets replace the teacher's passes
            for layer, block in enumerate(progress(blocks, desc="mask_search tuning", unit="block")):
                last = layer == len(blocks) - 1

                # Teacher: targets of both fits (recorded by the Fisher pass, or computed here), then its next inputs.
                hooks.head_mask, hooks.neuron_mask = teacher_head_mask, teacher_neuron_mask
                attention_targets, ffn_targets = [], []
                if teacher_targets is not None:
                    for batch_ids, mask, student in zip(ids, tokens, student_inputs):
                        attention, ffn = teacher_targets.targets(layer, batch_ids, mask, student.hidden_states)
                        attention_targets.append(attention)
                        ffn_targets.append(ffn)
                for block_input in teacher_inputs:
                    with _recording(block.get_submodule(layout.attention_output), "output") as attn, \
                            _recording(block.get_submodule(layout.ffn_out), "output") as ffn, \
                            _recording(block.get_submodule(layout.ffn_in[0]), "input") as ffn_input:
                        output = _run(block, block_input)
                    ffn_residual = block_input.hidden_states + attn[0] if structure.pre_norm else ffn_input[0]
                    attention_targets.append(attn[0] + block_input.hidden_states)
                    ffn_targets.append(ffn[0] + ffn_residual)
                    if not last:
                        block_input.hidden_states = output

                hooks.head_mask, hooks.neuron_mask = head, neuron  # in-place updates below take effect at once
                kept_units = head[layer].nonzero().flatten()
                kept_neurons = neuron[layer].nonzero().flatten()
                # A block that keeps some of both runs as a slimmed copy (the masked block computes every pruned
                # unit, then multiplies it by 0); else the masked block itself, with the pruned units' features.
                slimmed = slimmable and kept_units.numel() > 0 and kept_neurons.numel() > 0

                def student_block() -> tuple[nn.Module, Tensor, Tensor]:
                    """(the block the student runs, the kept heads' and neurons' indices in its output
                    projections' inputs) under the current scales."""
                    if not slimmed:
                        return block, kept_units, kept_neurons
                    return (_slimmed_copy(block, adapter, structure, head, neuron, layer),
                            torch.arange(kept_units.numel()), torch.arange(kept_neurons.numel()))

                if kept_units.numel():
                    runner, units, _ = student_block()
                    out = runner.get_submodule(layout.attention_output)
                    bias = out.bias.detach() if out.bias is not None else 0.0
                    weight = out.weight.detach()
                    attention_equations = KeptUnitEquations(weight, units, unit_width, _product_dtype(weight))
                    equations = _FitEquations(heldout_samples > 0)
                    for block_input, target, fit, heldout in zip(student_inputs, attention_targets, fit_tokens,
                                                                 heldout_tokens):
                        with _recording(out, "input") as context, _stopping_after(out):
                            try:
                                _run(runner, block_input)
                            except _StopBlock:
                                pass
                        residual = block_input.hidden_states
                        equations.add(attention_equations, context[0], target - bias - residual, fit, heldout)
                    solution = equations.solve(damp, max_abs_scale)  # scales of 1 when rejected
                    log.append(_log_entry(layer, "attention", kept_units.numel(), solution))
                    head[layer, kept_units] *= solution.scales.to(device, torch.float32)

                runner, _, neurons = student_block()  # with the attention's new scales
                ffn_out = runner.get_submodule(layout.ffn_out)
                attention_out = runner.get_submodule(layout.attention_output)
                ffn_in = runner.get_submodule(layout.ffn_in[0])
                # (FFN output-projection input, FFN residual) per batch, to advance the student without a pass
                output_norm = None if structure.pre_norm else runner.get_submodule(layout.ffn_output_norm)
                ffn_pass: list[tuple[Tensor, Tensor]] | None = [] if not last else None
                if kept_neurons.numel():
                    weight = ffn_out.weight.detach()
                    bias = ffn_out.bias.detach() if ffn_out.bias is not None else 0.0

                    ffn_equations = KeptUnitEquations(weight, neurons, 1, _product_dtype(weight))
                    equations = _FitEquations(heldout_samples > 0)
                    for block_input, target, fit, heldout in zip(student_inputs, ffn_targets, fit_tokens,
                                                                 heldout_tokens):
                        with _recording(ffn_out, "input") as activations, _recording(attention_out, "output") as attn, \
                                _recording(ffn_in, "input") as ffn_input:
                            _run(runner, block_input)
                        residual = block_input.hidden_states + attn[0] if structure.pre_norm else ffn_input[0]
                        if ffn_pass is not None:
                            ffn_pass.append((activations[0], residual))
                        if last and first_token_only:
                            fit, heldout = fit & _first_tokens(fit), heldout & _first_tokens(heldout)
                        equations.add(ffn_equations, activations[0], target - bias - residual, fit, heldout)
                    solution = equations.solve(damp, max_abs_scale)  # scales of 1 when rejected
                    log.append(_log_entry(layer, "ffn", kept_neurons.numel(), solution))
                    neuron[layer, kept_neurons] *= solution.scales.to(device, torch.float32)

                if not last and ffn_pass:
                    # the recorded activations carry the old scales (in the masked block's input, or in the slimmed
                    # block's weight); the fit multiplied them by solution.scales
                    change = torch.ones(ffn_out.in_features, device=device)
                    change[neurons] = solution.scales.to(device, torch.float32)
                    for block_input, (activations, residual) in zip(student_inputs, ffn_pass):
                        output = residual + nn.functional.linear(activations * change, ffn_out.weight, ffn_out.bias)
                        block_input.hidden_states = output if output_norm is None else output_norm(output)
                elif not last:
                    for block_input in student_inputs:
                        block_input.hidden_states = _run(runner, block_input)
    finally:
        model.train(was_training)
    return TuningResult(head.cpu(), neuron.cpu(), log, heldout_samples)
