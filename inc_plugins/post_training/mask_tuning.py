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

Cost: the teacher runs the whole block; the attention fit stops the block once the attention output projection's
input is recorded (the FFN would be wasted work). The student's passes run a slimmed copy of the block
(``surgery_transformers.slim_block``: only the kept heads and neurons, their current scales folded into the output
projections), so they cost what the pruned block costs; the fits see the same contributions (kept features times
scaled weight columns instead of scaled features times weight columns). The FFN fit's pass then replays the contexts
the attention fit's pass recorded (``_ReplayedAttention``; the kept heads' context does not depend on their scales,
which sit in the output projection) instead of running the query, key and value projections and the attention again.
A block that keeps no head or no neuron, and a family that cannot be slimmed, runs the masked block, whole. The
fits' token sums are products of ``CHUNK_TOKENS`` tokens at a time, the FFN's ``X^T X`` by BLAS's symmetric rank-k
update (half the work of a general product; it is tuning's largest cost). The block output is the FFN residual plus
the FFN output (pre-norm), or the block's last LayerNorm of that sum (post-norm), so the student's next input is
computed from the FFN fit's recorded activations with the tuned scales (one output-projection matmul) instead of a
fourth pass. The calibration sequences are regrouped by length first (``data.rebatch_by_length``): every fit sums
over real tokens, so the grouping does not change it, and random batches of sentences are about half padding.

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
from scipy.linalg import blas
from torch import Tensor, nn

from inc_plugins.algorithms.mask_tuning import ScaleSolution, choose_mask_scales
from inc_plugins.execution.calibration import BlockInput, capture_block_inputs, first_output
from inc_plugins.models.architectures import adapter_for
from inc_plugins.models.first_token_heads import reads_first_token_only
from inc_plugins.models.structure_masks import (MaskHooks, MaskStructure, expand_head_mask, group_head_mask,
                                                mask_structure)
from inc_plugins.models.surgery_transformers import can_slim, replace_attention, slim_block
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


class _TokenSums:
    """The token sums of one fit's normal equations (``KeptUnitEquations.statistics``) over the tokens added, and
    the targets' squared norm when ``target_norm``. Tokens are multiplied in chunks of ``CHUNK_TOKENS``."""

    def __init__(self, equations: KeptUnitEquations, target_norm: bool = False):
        self.equations, self.target_norm = equations, target_norm
        self.sums = equations.zero_statistics()
        self.target_sq = 0.0
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._pending_tokens = 0

    def add(self, rows: Tensor, target: Tensor) -> None:
        """``rows`` [tokens, features] (the output projection's input) and ``target`` [tokens, hidden]."""
        self._pending.append((rows, target))
        self._pending_tokens += rows.shape[0]
        if self._pending_tokens >= CHUNK_TOKENS:
            self._multiply()

    def _multiply(self) -> None:
        if not self._pending:
            return
        rows, target = (torch.cat(parts) for parts in zip(*self._pending))
        self._pending, self._pending_tokens = [], 0
        self.sums = tuple(total + part for total, part in zip(self.sums, self.equations.statistics(rows, target)))
        if self.target_norm:
            self.target_sq += float(target.double().square().sum())

    def normal_equations(self) -> tuple[Tensor, Tensor]:
        self._multiply()
        return self.equations.equations(*self.sums)


class _FitEquations:
    """One sub-layer's normal equations, summed over batches: on the fitted tokens, and on the held-out tokens
    with the held-out target's squared norm."""

    def __init__(self, equations: KeptUnitEquations, heldout: bool):
        self.fit = _TokenSums(equations)
        self.heldout = _TokenSums(equations, target_norm=True) if heldout else None

    def add(self, rows: Tensor, target: Tensor, fit_tokens: Tensor, heldout_tokens: Tensor) -> None:
        """``rows`` [batch, seq, features] and ``target`` [batch, seq, hidden] of one batch; ``*_tokens`` [batch,
        seq] booleans."""
        self.fit.add(real_token_rows(rows, fit_tokens), real_token_rows(target, fit_tokens))
        if self.heldout is not None and heldout_tokens.any():
            self.heldout.add(real_token_rows(rows, heldout_tokens), real_token_rows(target, heldout_tokens))

    def solve(self, damp: float, max_abs_scale: float) -> ScaleSolution:
        heldout = None
        if self.heldout is not None:
            heldout = (*self.heldout.normal_equations(), self.heldout.target_sq)
        return choose_mask_scales(self.fit.normal_equations(), heldout, damp=damp, max_abs_scale=max_abs_scale)


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
    """One chunk's products run in the activations' precision, at least float32 (float64 ones stay float64), and
    are summed over chunks in float64: float64 products cost twice the time for a change far below the fits'
    sensitivity to which calibration samples were drawn."""
    return torch.float64 if activations.dtype == torch.float64 else torch.float32


# Tokens per product of a fit's token sums. A batch of sentences holds a few hundred tokens; products that small,
# one per batch, ran the fits at half the machine's matrix-multiply speed (MiniLM, 2048 samples: 13 s of tuning's
# 27, 2026-12-04). Chunks this size run at full speed and bound the memory a chunk takes.
CHUNK_TOKENS = 8192


def _upper_gram(x: Tensor) -> Tensor:
    """X^T X of a contiguous [tokens, features] matrix; only its upper triangle is meant (the rest may be 0).

    On the CPU, BLAS's symmetric rank-k update (syrk) computes the upper triangle alone: half the multiply-adds of a
    general product, and the largest cost of tuning an FFN of a thousand kept neurons."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.shape[0] > 0:
        syrk = blas.ssyrk if x.dtype == torch.float32 else blas.dsyrk
        return torch.from_numpy(syrk(1.0, x.detach().numpy().T))  # x^T, column-major [features, tokens]: x^T x
    return x.T @ x


class KeptUnitEquations:
    """Normal equations (gram [n_kept, n_kept], rhs [n_kept], float64) of one sub-layer's fit, without building the
    contributions A.

    The sub-layer's output projection (``weight`` [hidden, n_units * unit_width]) reads unit u's features
    ``u*unit_width : (u+1)*unit_width`` (a head's context, or one FFN neuron's activation: unit_width 1). With X the
    kept features of the tokens [tokens, kept features], B their targets [tokens, hidden] and W the kept features'
    columns, unit u's contribution at token t is ``X_u[t] W_u^T``, so

        gram[u, v] = sum over i in u, j in v of (W^T W)[i, j] * (X^T X)[i, j]
        rhs[u]     = sum over i in u and h of W[h, i] * (X^T B)[i, h]

    Both are linear in the token sums X^T X and X^T B (``statistics``, added up over the tokens), so ``equations``
    forms them once per fit from the totals; ``W^T W`` is formed once, here. Cost per token: the kept features'
    outer product and their product with the target, where the explicit contributions cost ``n_kept`` times the
    output size.
    """

    def __init__(self, weight: Tensor, kept_units: Tensor, unit_width: int, dtype: torch.dtype):
        self.n_kept, self.unit_width = kept_units.numel(), unit_width
        self.columns = (kept_units[:, None] * unit_width + torch.arange(unit_width, device=kept_units.device)).flatten()
        self.weight = weight[:, self.columns].to(dtype)
        self.weight_gram = (self.weight.T @ self.weight).double()
        # a slimmed block's output projection reads kept features only: no columns to pick (a copy per chunk)
        self.every_column = torch.equal(self.columns.cpu(), torch.arange(weight.shape[1]))

    def zero_statistics(self) -> tuple[Tensor, Tensor]:
        features, hidden = self.columns.numel(), self.weight.shape[0]
        return (torch.zeros(features, features, dtype=torch.float64, device=self.weight.device),
                torch.zeros(features, hidden, dtype=torch.float64, device=self.weight.device))

    def statistics(self, inputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(upper triangle of X^T X, X^T B) in float64; ``inputs``: [tokens, n_units * unit_width], the output
        projection's input; ``target``: [tokens, hidden]."""
        x = (inputs if self.every_column else inputs[:, self.columns]).to(self.weight.dtype).contiguous()
        return _upper_gram(x).double(), (x.T @ target.to(x.dtype)).double()

    def equations(self, xtx_upper: Tensor, xtb: Tensor) -> tuple[Tensor, Tensor]:
        """(gram, rhs) from the token sums ``statistics`` returns."""
        n, width = self.n_kept, self.unit_width
        xtx = xtx_upper.triu() + xtx_upper.triu(1).T
        gram = (self.weight_gram * xtx).view(n, width, n, width).sum(dim=(1, 3))
        rhs = (xtb * self.weight.T.double()).sum(dim=1).view(n, width).sum(dim=1)
        return gram, rhs

    def __call__(self, inputs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return self.equations(*self.statistics(inputs, target))


def unit_normal_equations(inputs: Tensor, weight: Tensor, kept_units: Tensor, target: Tensor,
                          unit_width: int = 1) -> tuple[Tensor, Tensor]:
    """``KeptUnitEquations`` of one batch: equal to ``algorithms.mask_tuning.normal_equations`` of the explicit
    contributions (unit u's ``inputs[:, u's features] @ weight[:, u's features].T``, flattened)."""
    return KeptUnitEquations(weight, kept_units, unit_width, _product_dtype(inputs))(inputs, target)


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


# The FFN fit's pass replays the contexts the attention fit's pass recorded when they take at most this much memory
# (MiniLM-L6, 2048 sentences: about 70 MB per block); above it, the pass runs the attention again.
REPLAY_MAX_BYTES = 1 << 30


class _ReplayedAttention(nn.Module):
    """Stands in for a slimmed student block's attention module in the FFN fit's pass (``replace_attention``): its
    output is ``context``, the output projection's input that the attention fit's pass recorded for the batch being
    run, through the projection when the replaced module holds it. Slimming puts the kept heads' scales in the
    projection's columns, so their context is the same under the new scales, and the pass skips the query, key and
    value projections and the attention itself."""

    def __init__(self, projection_name: str | None, projection: nn.Linear | None):
        super().__init__()
        self.context: Tensor | None = None
        self.projection_name = projection_name
        if projection_name is not None:
            self.add_module(projection_name, projection)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> tuple[Tensor, None]:
        if self.projection_name is None:
            return self.context, None
        return getattr(self, self.projection_name)(self.context), None


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
    sequence classifiers (``first_token_heads.reads_first_token_only``).
    ``teacher_targets``: the dense teacher's targets, recorded on these batches by the Fisher
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
    first_token_only = reads_first_token_only(model) if first_token_only_last_ffn is None else first_token_only_last_ffn
    if teacher_targets is not None and teacher_targets.last_ffn_first_token_only and not first_token_only:
        raise ValueError("the recorded teacher targets of the last FFN are exact at the first token only (the Fisher "
                         "pass runs a first-token classifier's last FFN there alone): fit the last FFN there")
    unit_width = structure.heads_per_unit * structure.head_dim
    slimmable = can_slim(model)
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

                # contexts of the attention fit's pass, for the FFN fit's pass to replay (slimmed blocks only: the
                # masked block's recorded context carries the old scales)
                padded_tokens = sum(mask.numel() for mask in tokens)
                keep_contexts = slimmed and padded_tokens * kept_units.numel() * unit_width * 4 <= REPLAY_MAX_BYTES
                contexts: list[Tensor] = []
                if kept_units.numel():
                    runner, units, _ = student_block()
                    out = runner.get_submodule(layout.attention_output)
                    bias = out.bias.detach() if out.bias is not None else 0.0
                    weight = out.weight.detach()
                    equations = _FitEquations(KeptUnitEquations(weight, units, unit_width, _product_dtype(weight)),
                                              heldout_samples > 0)
                    for block_input, target, fit, heldout in zip(student_inputs, attention_targets, fit_tokens,
                                                                 heldout_tokens):
                        with _recording(out, "input") as context, _stopping_after(out):
                            try:
                                _run(runner, block_input)
                            except _StopBlock:
                                pass
                        residual = block_input.hidden_states
                        equations.add(context[0], target - bias - residual, fit, heldout)
                        if keep_contexts:
                            contexts.append(context[0])
                    solution = equations.solve(damp, max_abs_scale)  # scales of 1 when rejected
                    log.append(_log_entry(layer, "attention", kept_units.numel(), solution))
                    head[layer, kept_units] *= solution.scales.to(device, torch.float32)

                runner, _, neurons = student_block()  # with the attention's new scales
                replayed = replace_attention(runner, adapter, _ReplayedAttention) if contexts else None
                ffn_out = runner.get_submodule(layout.ffn_out)
                attention_out = runner.get_submodule(layout.attention_output)
                ffn_in = runner.get_submodule(layout.ffn_in[0])
                # (FFN output-projection input, FFN residual) per batch, to advance the student without a pass
                output_norm = None if structure.pre_norm else runner.get_submodule(layout.ffn_output_norm)
                ffn_pass: list[tuple[Tensor, Tensor]] | None = [] if not last else None
                if kept_neurons.numel():
                    weight = ffn_out.weight.detach()
                    bias = ffn_out.bias.detach() if ffn_out.bias is not None else 0.0
                    equations = _FitEquations(KeptUnitEquations(weight, neurons, 1, _product_dtype(weight)),
                                              heldout_samples > 0)
                    for index, (block_input, target, fit, heldout) in enumerate(zip(student_inputs, ffn_targets,
                                                                                    fit_tokens, heldout_tokens)):
                        if replayed is not None:
                            replayed.context = contexts[index]
                        with _recording(ffn_out, "input") as activations, _recording(attention_out, "output") as attn, \
                                _recording(ffn_in, "input") as ffn_input:
                            _run(runner, block_input)
                        residual = block_input.hidden_states + attn[0] if structure.pre_norm else ffn_input[0]
                        if ffn_pass is not None:
                            ffn_pass.append((activations[0], residual))
                        if last and first_token_only:
                            fit, heldout = fit & _first_tokens(fit), heldout & _first_tokens(heldout)
                        equations.add(activations[0], target - bias - residual, fit, heldout)
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
