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
   column of ``ffn_out``. Its normal equations are built without materialising A:
   ``A A^T = (W^T W) * (H^T H)`` and ``A b = sum_t H[t] * (b_t W)`` (H: activations [tokens, kept], W: columns).
   For a sequence classifier's last block only the first token (what the pooler / classifier reads) is fitted,
   as in the reference.
3. Both streams advance through the block (teacher: teacher masks; student: the tuned masks), so block l+1 is fitted
   on the inputs the tuned earlier blocks produce.

Cost: the teacher and the FFN fit run the whole block; the attention fit stops the block once the attention output
projection's input is recorded (the FFN would be wasted work). In pre-norm blocks the block output is the FFN
residual plus the FFN output, so the student's next input is computed from the FFN fit's recorded activations with
the tuned scales (one output-projection matmul) instead of a fourth pass; post-norm blocks end in a LayerNorm and
run the block again.

Residuals: the attention residual is the block input in every supported family. The FFN residual is the FFN's
input in post-norm (bert-like) blocks and block input + attention output in pre-norm (llama-like) blocks.

A rejected solve (LSMR did not converge, or a scale beyond ``max_abs_scale``) keeps that layer's scales at their
current values and stops tuning: later blocks would be tuned on inputs the rejected fit produced, so like the
reference every later sub-layer is left untuned. The reference skips the attention of block 0; this follows the
paper and tunes it, and it does not add the reference's extra constant column to the attention fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from inc_plugins.algorithms.mask_tuning import normal_equations, solve_mask_scales
from inc_plugins.execution.calibration import BlockInput, capture_block_inputs, first_output
from inc_plugins.models.architectures import adapter_for
from inc_plugins.models.structure_masks import MaskHooks, MaskStructure, group_head_mask, mask_structure

from .data import token_mask

__all__ = ["LayerTuning", "TuningResult", "head_normal_equations", "ffn_normal_equations", "tune_mask_scales"]

_MAX_CHUNK_ELEMENTS = 1 << 22  # float32 elements of explicit head contributions built at once (16 MiB)


@dataclass(frozen=True)
class LayerTuning:
    """One least-squares fit: ``part`` is "attention" or "ffn"; ``reason`` says why a fit was rejected."""

    layer: int
    part: str
    n_kept: int
    accepted: bool
    reason: str = ""


@dataclass(frozen=True)
class TuningResult:
    """Tuned float masks (0 = pruned, else the unit's scale): ``unit_head_mask`` [n_layers, n_head_units],
    ``neuron_mask`` [n_layers, n_neurons]; ``log`` has one entry per fit tried; ``stopped_at`` is the block of the
    first rejected fit (None when none was rejected)."""

    unit_head_mask: Tensor
    neuron_mask: Tensor
    log: list[LayerTuning]
    stopped_at: int | None


def head_normal_equations(
    context: Tensor, weight: Tensor, kept_units: Tensor, target: Tensor, unit_width: int
) -> tuple[Tensor, Tensor]:
    """(gram [n_kept, n_kept], rhs [n_kept]) float64 of the attention fit for one batch.

    ``context``: [tokens, n_heads * head_dim], the output projection's input; ``weight``: its weight
    [hidden, n_heads * head_dim]; ``kept_units``: unit indices; unit u owns input features
    ``u*unit_width : (u+1)*unit_width``; ``target``: [tokens, hidden]. Built in token chunks.
    """
    n_kept, hidden = kept_units.numel(), weight.shape[0]
    columns = [slice(int(u) * unit_width, (int(u) + 1) * unit_width) for u in kept_units]
    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(1, n_kept * hidden))
    gram = torch.zeros(n_kept, n_kept, dtype=torch.float64, device=context.device)
    rhs = torch.zeros(n_kept, dtype=torch.float64, device=context.device)
    for start in range(0, context.shape[0], chunk):
        rows = context[start : start + chunk]
        contributions = torch.stack([(rows[:, c] @ weight[:, c].T).flatten() for c in columns])
        chunk_gram, chunk_rhs = normal_equations(contributions, target[start : start + chunk].flatten())
        gram += chunk_gram
        rhs += chunk_rhs
    return gram, rhs


def ffn_normal_equations(activations: Tensor, weight: Tensor, kept: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(gram [n_kept, n_kept], rhs [n_kept]) float64 of the FFN fit for one batch, without building A.

    ``activations``: [tokens, n_neurons], ``ffn_out``'s input; ``weight``: ``ffn_out``'s weight [hidden, n_neurons];
    ``kept``: neuron indices; ``target``: [tokens, hidden]. Equals ``normal_equations`` of the explicit
    contributions ``A[n] = outer(activations[:, n], weight[:, n]).flatten()``.
    """
    h = activations[:, kept].double()
    w = weight[:, kept].double()
    gram = (w.T @ w) * (h.T @ h)
    rhs = ((target.double() @ w) * h).sum(dim=0)
    return gram, rhs


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


def _rows(tensor: Tensor, tokens: Tensor) -> Tensor:
    """[batch, seq, features] -> [selected tokens, features]."""
    return tensor.reshape(-1, tensor.shape[-1])[tokens.flatten().to(tensor.device)]


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
) -> TuningResult:
    """Tune the kept units' scales of ``unit_head_mask`` [n_layers, n_head_units] (per query head is accepted too)
    and ``neuron_mask`` [n_layers, n_neurons] block by block; see the module docstring. The model is unchanged.

    ``batches``: dict batches (labels are not used). ``damp``/``max_abs_scale``: see ``solve_mask_scales``.
    ``first_token_only_last_ffn``: fit only the first token in the last block's FFN; None = yes for bert-like
    sequence classifiers.
    """
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
    tokens = [token_mask(batch) for batch in batches]
    log: list[LayerTuning] = []
    stopped_at = None

    was_training = model.training
    model.eval()
    try:
        with MaskHooks(model) as hooks:
            teacher_inputs = capture_block_inputs(model, blocks, batches)
            student_inputs = [BlockInput(x.hidden_states.clone(), x.args, x.kwargs) for x in teacher_inputs]
            for layer, block in enumerate(blocks):
                attention_out = block.get_submodule(layout.attention_output)
                ffn_out = block.get_submodule(layout.ffn_out)
                ffn_in = block.get_submodule(layout.ffn_in[0])
                last = layer == len(blocks) - 1

                # Teacher: targets of both fits, then its next inputs.
                hooks.head_mask, hooks.neuron_mask = teacher_head_mask, teacher_neuron_mask
                attention_targets, ffn_targets = [], []
                for block_input in teacher_inputs:
                    with _recording(attention_out, "output") as attn, _recording(ffn_out, "output") as ffn, \
                            _recording(ffn_in, "input") as ffn_input:
                        output = _run(block, block_input)
                    ffn_residual = block_input.hidden_states + attn[0] if structure.pre_norm else ffn_input[0]
                    attention_targets.append(attn[0] + block_input.hidden_states)
                    ffn_targets.append(ffn[0] + ffn_residual)
                    if not last:
                        block_input.hidden_states = output

                hooks.head_mask, hooks.neuron_mask = head, neuron  # in-place updates below take effect at once
                kept_units = head[layer].nonzero().flatten()
                if kept_units.numel():
                    weight = attention_out.weight.detach()
                    bias = attention_out.bias.detach() if attention_out.bias is not None else 0.0
                    gram = rhs = 0
                    for block_input, target, mask in zip(student_inputs, attention_targets, tokens):
                        with _recording(attention_out, "input") as context, _stopping_after(attention_out):
                            try:
                                _run(block, block_input)
                            except _StopBlock:
                                pass
                        residual = block_input.hidden_states
                        batch_gram, batch_rhs = head_normal_equations(
                            _rows(context[0], mask), weight, kept_units, _rows(target - bias - residual, mask), unit_width
                        )
                        gram, rhs = gram + batch_gram, rhs + batch_rhs
                    solution = solve_mask_scales(gram, rhs, damp=damp, max_abs_scale=max_abs_scale)
                    log.append(LayerTuning(layer, "attention", kept_units.numel(), solution.accepted, solution.reason))
                    if not solution.accepted:
                        stopped_at = layer
                        break
                    head[layer, kept_units] *= solution.scales.to(device, torch.float32)

                kept_neurons = neuron[layer].nonzero().flatten()
                # pre-norm: (FFN output-projection input, FFN residual) per batch, to advance the student without a pass
                ffn_pass: list[tuple[Tensor, Tensor]] | None = [] if structure.pre_norm and not last else None
                if kept_neurons.numel():
                    weight = ffn_out.weight.detach()
                    bias = ffn_out.bias.detach() if ffn_out.bias is not None else 0.0
                    gram = rhs = 0
                    for block_input, target, mask in zip(student_inputs, ffn_targets, tokens):
                        with _recording(ffn_out, "input") as activations, _recording(attention_out, "output") as attn, \
                                _recording(ffn_in, "input") as ffn_input:
                            _run(block, block_input)
                        residual = block_input.hidden_states + attn[0] if structure.pre_norm else ffn_input[0]
                        if ffn_pass is not None:
                            ffn_pass.append((activations[0], residual))
                        fitted = _first_tokens(mask) if last and first_token_only else mask
                        batch_gram, batch_rhs = ffn_normal_equations(
                            _rows(activations[0], fitted), weight, kept_neurons, _rows(target - bias - residual, fitted)
                        )
                        gram, rhs = gram + batch_gram, rhs + batch_rhs
                    solution = solve_mask_scales(gram, rhs, damp=damp, max_abs_scale=max_abs_scale)
                    log.append(LayerTuning(layer, "ffn", kept_neurons.numel(), solution.accepted, solution.reason))
                    if not solution.accepted:
                        stopped_at = layer
                        break
                    neuron[layer, kept_neurons] *= solution.scales.to(device, torch.float32)

                if not last and ffn_pass:
                    # the recorded activations carry the old scales; the fit multiplied them by solution.scales
                    change = torch.ones(structure.n_neurons, device=device)
                    change[kept_neurons] = solution.scales.to(device, torch.float32)
                    for block_input, (activations, residual) in zip(student_inputs, ffn_pass):
                        block_input.hidden_states = residual + nn.functional.linear(
                            activations * change, ffn_out.weight, ffn_out.bias
                        )
                elif not last:
                    for block_input in student_inputs:
                        block_input.hidden_states = _run(block, block_input)
    finally:
        model.train(was_training)
    return TuningResult(head.cpu(), neuron.cpu(), log, stopped_at)
