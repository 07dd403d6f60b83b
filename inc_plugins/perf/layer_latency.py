"""Measuring a latency table (``inc_plugins.perf.latency_table``) for one transformer layer on this machine.

Every value is the median of `repeats` timed calls (after `warmup` calls) of a copy of the model's first layer,
slimmed with ``slim_block`` to the measured size and fed the inputs captured from a real forward pass (random token
ids, full attention mask). The sizes are timed by the interleaved timer (``inc_plugins.perf.timing``: each round
times every size once, in a rotated order), so a slow phase of a shared machine hits all sizes alike instead of a
few; this holds one slimmed copy of the layer per measured size in memory. Latency cannot fall when units are
added, so the medians are then replaced by their closest nondecreasing sequence (least squares,
pool-adjacent-violators): noise that would make a bigger layer look cheaper is averaged out. Only some sizes are
measured (every `head_step`-th head count, every `neuron_step`-th neuron count, and the full sizes); the rest are
linearly interpolated. Interpolation cannot show the steps a kernel makes at its preferred widths, so
`neuron_widths` adds neuron counts to measure (e.g. every width from 32 to 320), and the table keeps the medians
before the nondecreasing fit (``measured_neuron_seconds``), since a width just below a step can be slower than the
step itself, which the fit would average away (``width_choice`` picks a width multiple from them). Under
grouped-query attention, heads can only be removed by whole key/value groups: sizes are measured in groups and the
entries between multiples of the group size are interpolated. Negative neuron differences from timing noise are
clamped to 0 in the table (not in ``measured_neuron_seconds``).

The layer runs on a backend of ``inc_plugins.perf.backends`` that can time a lone layer (``LAYER_BACKENDS``: eager
so far); the table records the backend's name and the model's dtype.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from inc_plugins.models.architectures import adapter_for
from inc_plugins.models.surgery_transformers import slim_block

from .backends import layer_backend
from .latency_table import LatencyTable, current_machine
from .timing import interleaved_median_seconds

_DTYPE_TAGS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def describe_model(model: nn.Module) -> dict:
    """The architecture facts a layer's latency depends on."""
    adapter = adapter_for(model)
    _, blocks = adapter.blocks(model)
    config = model.config
    return {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_heads": adapter.num_heads(model),
        "num_kv_heads": adapter.num_kv_heads(model),
        "head_dim": adapter.head_dim(model),
        "intermediate_size": blocks[0].get_submodule(adapter.layout.ffn_out).in_features,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": getattr(config, "_attn_implementation", None),
    }


class _Captured(Exception):
    pass


def _capture_block_inputs(model: nn.Module, block: nn.Module, batch_size: int, seq_len: int, seed: int):
    """(args, kwargs) that `model` passes to `block` for a random [batch_size, seq_len] batch (no padding)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    inputs = {
        "input_ids": torch.randint(1, vocab, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
    }
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False  # a cache would grow with every timed call
    captured = {}

    def capture(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Captured

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(**inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(model).__name__}'s forward never called its first block")
    kwargs = {k: v for k, v in captured["kwargs"].items() if k not in ("past_key_values", "past_key_value")}
    return captured["args"], kwargs


def nondecreasing_fit(values: Sequence[float]) -> list[float]:
    """The nondecreasing sequence closest to `values` in least squares (pool adjacent violators): each run of
    values that decreases is replaced by its mean."""
    blocks: list[list[float]] = []  # [sum, count] of pooled runs
    for value in values:
        blocks.append([float(value), 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


def sample_points(n_units: int, step: int) -> list[int]:
    """0, step, 2*step, ... and n_units."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return sorted(set(range(0, n_units + 1, step)) | {n_units})


def interpolate(points: Sequence[int], values: Sequence[float], n_units: int) -> list[float]:
    """Piecewise-linear interpolation of measured (point, value) pairs to every count 0..n_units."""
    grid = torch.arange(n_units + 1, dtype=torch.float64)
    xs = torch.as_tensor(points, dtype=torch.float64)
    ys = torch.as_tensor(values, dtype=torch.float64)
    right = torch.searchsorted(xs, grid).clamp(1, len(xs) - 1)
    left = right - 1
    weight = (grid - xs[left]) / (xs[right] - xs[left])
    return (ys[left] + weight * (ys[right] - ys[left])).tolist()


def measure_latency_table(
    model: nn.Module,
    batch_size: int = 1,
    seq_len: int = 128,
    backend: str = "eager",
    repeats: int = 10,
    warmup: int = 2,
    head_step: int = 1,
    neuron_step: int = 64,
    seed: int = 0,
    neuron_widths: Sequence[int] = (),
) -> LatencyTable:
    """Measure a latency table for one layer of `model` (a dense bert-like or llama-like transformers model).

    head_step: measure every head_step-th count of key/value groups (= heads without GQA); neuron_step: every
    neuron_step-th neuron count; neuron_widths: more neuron counts to measure, each in [1, n_neurons]. Full sizes
    and 0 are always measured. The model is not modified.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    adapter = adapter_for(model)
    description = describe_model(model)
    runner = layer_backend(backend, _DTYPE_TAGS.get(description["dtype"], description["dtype"]))
    n_heads, n_kv, head_dim = description["num_heads"], description["num_kv_heads"], description["head_dim"]
    n_neurons = description["intermediate_size"]
    group_size = n_heads // n_kv
    _, blocks = adapter.blocks(model)
    was_training = model.training
    model.eval()
    try:
        args, kwargs = _capture_block_inputs(model, blocks[0], batch_size, seq_len, seed)
    finally:
        model.train(was_training)

    def layer_call(heads: int, neurons: int) -> Callable[[], object]:
        block = copy.deepcopy(blocks[0]).eval()
        slim_block(block, adapter, range(heads), range(neurons), num_heads=n_heads, num_kv_heads=n_kv,
                   head_dim=head_dim)
        prepared = runner.prepare_module(block)
        return lambda: prepared(*args, **kwargs)

    head_points = [groups * group_size for groups in sample_points(n_kv, head_step)]
    outside = [width for width in neuron_widths if not 1 <= width <= n_neurons]
    if outside:
        raise ValueError(f"neuron_widths must lie in [1, {n_neurons}] (the FFN width), got {outside[:5]}")
    neuron_points = sorted(set(sample_points(n_neurons, neuron_step)) | set(neuron_widths))
    calls = [layer_call(heads, 0) for heads in head_points] + [layer_call(0, n) for n in neuron_points[1:]]
    with torch.inference_mode():
        seconds = interleaved_median_seconds(calls, warmup, repeats)
    head_measured = nondecreasing_fit(seconds[: len(head_points)])
    empty_layer = seconds[0]
    neuron_seconds = [0.0] + [t - empty_layer for t in seconds[len(head_points):]]
    neuron_measured = nondecreasing_fit([max(t, 0.0) for t in neuron_seconds])
    return LatencyTable(
        head_latency=interpolate(head_points, head_measured, n_heads),
        neuron_latency=interpolate(neuron_points, neuron_measured, n_neurons),
        machine=current_machine(backend, batch_size, seq_len),
        model=description,
        measured_heads=head_points,
        measured_neurons=neuron_points,
        measured_neuron_seconds=neuron_seconds,
    )
