"""Latency lookup tables of one Transformer layer on this CPU, for the latency-constrained mask search.

    python -m inc_plugins.latency_table measure --model minilm-l6 --batch-size 8 --seq-len 128
    python -m inc_plugins.latency_table show ~/.cache/inc-plugins/latency/<file>.json

A table holds, for one model architecture, batch size, sequence length, backend and machine:

- ``head_latency`` [n_heads + 1]: seconds for one layer with h query heads kept and no FFN neurons, h = 0..H.
  It includes the layer's fixed cost (residuals, LayerNorms, output-projection biases), so
  ``head_latency[0]`` is the cost of a layer with nothing left but that;
- ``neuron_latency`` [n_neurons + 1]: the extra seconds that n FFN neurons add to such a layer
  (``neuron_latency[0] == 0``; negative differences from timing noise are clamped to 0).

So ``head_latency[h] + neuron_latency[n]`` estimates a layer with h heads and n neurons, and summing over layers
estimates the stack (embeddings and task head excluded), which is what ``search_masks_under_latency`` expects.

Every value is the median of `repeats` timed calls (after `warmup` calls) of a copy of the model's first layer,
slimmed with ``slimming.slim_block`` to the measured size and fed the inputs captured from a real forward pass
(random token ids, full attention mask). The sizes are timed in interleaved rounds (each round times every size
once, in a rotated order), so a slow phase of a shared machine hits all sizes alike instead of a few; this holds
one slimmed copy of the layer per measured size in memory. Latency cannot fall when units are added, so the
medians are then replaced by their closest nondecreasing sequence (least squares, pool-adjacent-violators): noise
that would make a bigger layer look cheaper is averaged out. Only some sizes are measured (every `head_step`-th
head count, every `neuron_step`-th neuron count, and the full sizes); the rest are linearly interpolated. Under grouped-query
attention, heads can only be removed by whole key/value groups: sizes are measured in groups and the entries
between multiples of the group size are interpolated.

Latency depends on the machine, so each table records ``current_machine()`` and is stored as one file per
(model, machine, backend, threads, batch, sequence length) under ``assets.cache_root() / "latency"``.
``check_same_machine`` raises ``LatencyTableMismatch`` when a table was measured on another CPU model, with other
CPU features, another backend or another thread count (a different torch version only warns).

Backends: "eager" (fp32 eager PyTorch). A backend is a function that turns a module into a callable
(``BACKENDS``). "inductor" is not offered yet: ``torch.compile`` of each measured size recompiles one code object,
and after dynamo's recompile limit (8) it silently falls back to eager, so an inductor backend must call
``torch._dynamo.reset()`` per size (and keep warmup >= 1 so compilation is not timed).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from inc_plugins.assets import cache_root
from inc_plugins.models.architectures import adapter_for
from inc_plugins.models.slimming import slim_block

FORMAT_VERSION = 1
CPU_FLAGS_OF_INTEREST = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")

Backend = Callable[[nn.Module], Callable[..., object]]


def _eager(module: nn.Module) -> Callable[..., object]:
    return module


BACKENDS: dict[str, Backend] = {"eager": _eager}
"""Backend name -> function that prepares a module for timing. Add "inductor" here (torch.compile)."""


class LatencyTableMismatch(RuntimeError):
    """A latency table was measured on another machine, backend or thread count than the current one."""


@dataclass
class LatencyTable:
    """Layer latency in seconds by kept units; see the module docstring for what each entry includes."""

    head_latency: list[float]  # [n_heads + 1]
    neuron_latency: list[float]  # [n_neurons + 1]
    machine: dict  # current_machine() at measurement time
    model: dict = field(default_factory=dict)  # architecture described by describe_model()
    measured_heads: list[int] = field(default_factory=list)  # head counts actually timed (the rest interpolated)
    measured_neurons: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name in ("head_latency", "neuron_latency"):
            values = [float(v) for v in getattr(self, name)]
            if len(values) < 2 or any(not v >= 0 or v == float("inf") for v in values):
                raise ValueError(f"{name} must hold at least 2 finite latencies >= 0 seconds, got {values[:8]}...")
            setattr(self, name, values)


# ------------------------------------------------------------------------------------------------------ machine


def _cpuinfo() -> dict[str, str]:
    """First processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def current_machine(backend: str = "eager", batch_size: int | None = None, seq_len: int | None = None) -> dict:
    """What a latency measurement depends on: CPU model and features, torch version and threads, backend, shape."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS_OF_INTEREST},
        "architecture": platform.machine(),
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "backend": backend,
        "batch_size": batch_size,
        "seq_len": seq_len,
    }


def check_same_machine(
    table: LatencyTable, backend: str, batch_size: int | None = None, seq_len: int | None = None
) -> None:
    """Raise LatencyTableMismatch when `table` was measured on another CPU model, with other CPU features, another
    backend or thread count (or another batch size / sequence length, when given). Latencies do not transfer
    between those, so a search under a latency budget would optimise for the wrong machine. A different torch
    version only warns (same kernels, usually similar timings).
    """
    now = current_machine(backend, batch_size, seq_len)
    keys = ["cpu_model", "cpu_flags", "backend", "num_threads"]
    keys += [key for key, value in (("batch_size", batch_size), ("seq_len", seq_len)) if value is not None]
    differences = [
        f"{key}: table {table.machine.get(key)!r}, now {now[key]!r}" for key in keys if table.machine.get(key) != now[key]
    ]
    if differences:
        raise LatencyTableMismatch(
            "latency table does not describe this setup (" + "; ".join(differences) + "). Measure one here: "
            f"{sys.executable} -m inc_plugins.latency_table measure --help"
        )
    if table.machine.get("torch_version") != now["torch_version"]:
        warnings.warn(
            f"latency table was measured with torch {table.machine.get('torch_version')}, running {now['torch_version']}",
            stacklevel=2,
        )


# ------------------------------------------------------------------------------------------------------ measure


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


def _interleaved_median_seconds(calls: Sequence[Callable[[], object]], warmup: int, repeats: int) -> list[float]:
    """Median seconds of each call: `warmup` untimed calls each, then `repeats` rounds that time every call once,
    starting one further along the list each round."""
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for round_index in range(repeats):
        for offset in range(len(calls)):
            index = (round_index + offset) % len(calls)
            start = time.perf_counter()
            calls[index]()
            times[index].append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


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


def _sample_points(n_units: int, step: int) -> list[int]:
    """0, step, 2*step, ... and n_units."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return sorted(set(range(0, n_units + 1, step)) | {n_units})


def _interpolate(points: Sequence[int], values: Sequence[float], n_units: int) -> list[float]:
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
) -> LatencyTable:
    """Measure a latency table for one layer of `model` (a dense bert-like or llama-like transformers model).

    head_step: measure every head_step-th count of key/value groups (= heads without GQA); neuron_step: every
    neuron_step-th neuron count. Full sizes and 0 are always measured. The model is not modified.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    adapter = adapter_for(model)
    description = describe_model(model)
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
    prepare = BACKENDS[backend]

    def layer_call(heads: int, neurons: int) -> Callable[[], object]:
        block = copy.deepcopy(blocks[0]).eval()
        slim_block(block, adapter, range(heads), range(neurons), num_heads=n_heads, num_kv_heads=n_kv,
                   head_dim=head_dim)
        prepared = prepare(block)
        return lambda: prepared(*args, **kwargs)

    head_points = [groups * group_size for groups in _sample_points(n_kv, head_step)]
    neuron_points = _sample_points(n_neurons, neuron_step)
    calls = [layer_call(heads, 0) for heads in head_points] + [layer_call(0, n) for n in neuron_points[1:]]
    with torch.inference_mode():
        seconds = _interleaved_median_seconds(calls, warmup, repeats)
    head_measured = nondecreasing_fit(seconds[: len(head_points)])
    empty_layer = seconds[0]
    neuron_measured = nondecreasing_fit([0.0] + [max(t - empty_layer, 0.0) for t in seconds[len(head_points):]])
    return LatencyTable(
        head_latency=_interpolate(head_points, head_measured, n_heads),
        neuron_latency=_interpolate(neuron_points, neuron_measured, n_neurons),
        machine=current_machine(backend, batch_size, seq_len),
        model=description,
        measured_heads=head_points,
        measured_neurons=neuron_points,
    )


# ------------------------------------------------------------------------------------------------------ files


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-").lower() or "unknown"


def default_table_path(table: LatencyTable) -> Path:
    """``cache_root()/latency/<model>__<cpu>__<backend>-t<threads>-b<batch>-s<seq>.json``."""
    m, a = table.machine, table.model
    model_part = (
        f"{a.get('model_type')}-d{a.get('hidden_size')}-h{a.get('num_heads')}-kv{a.get('num_kv_heads')}"
        f"-ffn{a.get('intermediate_size')}-{a.get('dtype')}"
    )
    setup = f"{m.get('backend')}-t{m.get('num_threads')}-b{m.get('batch_size')}-s{m.get('seq_len')}"
    return cache_root() / "latency" / f"{_slug(model_part)}__{_slug(m.get('cpu_model'))}__{_slug(setup)}.json"


def save_latency_table(table: LatencyTable, path: str | os.PathLike | None = None) -> Path:
    """Write `table` as JSON (atomically: a temporary file in the same directory, then a rename). Returns the path;
    `path` defaults to ``default_table_path(table)``."""
    path = Path(path) if path is not None else default_table_path(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT_VERSION, **dataclasses.asdict(table)}
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o666 & ~umask)  # mkstemp makes the file owner-only; a table is for every user
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


def load_latency_table(path: str | os.PathLike) -> LatencyTable:
    """Read a table written by ``save_latency_table`` (ValueError naming the file when it is not one)."""
    path = Path(path)
    payload = json.loads(path.read_text())
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a latency table of format {FORMAT_VERSION}")
    known = {f.name for f in dataclasses.fields(LatencyTable)}
    missing = {"head_latency", "neuron_latency", "machine"} - payload.keys()
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}")
    try:
        return LatencyTable(**{k: v for k, v in payload.items() if k in known})
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


# ------------------------------------------------------------------------------------------------------ CLI


def _model_for_measuring(name: str, attn_implementation: str) -> nn.Module:
    """A one-layer model with `name`'s architecture and random weights (latency does not depend on the values).

    name: an asset ("minilm-l6", "smollm2-135m"), a synthetic tiny model ("tiny-bert", "tiny-llama"), or a
    directory holding a transformers config.json.
    """
    from transformers import AutoConfig, AutoModel

    from inc_plugins.assets import ASSETS, asset_path

    if name in ("tiny-bert", "tiny-llama"):
        from inc_plugins.testing import tiny_models

        model = tiny_models.tiny_bert_classifier() if name == "tiny-bert" else tiny_models.tiny_llama_lm()
        config = model.config
    elif name in ASSETS:
        directory = asset_path(name)
        ggufs = sorted(directory.glob("*.gguf"))
        config = AutoConfig.from_pretrained(directory, gguf_file=ggufs[0].name) if ggufs else AutoConfig.from_pretrained(directory)
    elif Path(name).is_dir():
        config = AutoConfig.from_pretrained(name)
    else:
        raise SystemExit(f"unknown model {name!r}: give an asset ({', '.join(ASSETS)}), tiny-bert, tiny-llama or a directory")
    config = copy.deepcopy(config)
    config.num_hidden_layers = 1
    return AutoModel.from_config(config, attn_implementation=attn_implementation).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inc_plugins.latency_table", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("measure", help="measure a table for one layer of a model on this machine")
    measure.add_argument("--model", required=True, help="asset name, tiny-bert, tiny-llama, or a model directory")
    measure.add_argument("--batch-size", type=int, default=1)
    measure.add_argument("--seq-len", type=int, default=128)
    measure.add_argument("--backend", default="eager", choices=sorted(BACKENDS))
    measure.add_argument("--repeats", type=int, default=10)
    measure.add_argument("--warmup", type=int, default=2)
    measure.add_argument("--head-step", type=int, default=1, help="measure every k-th head (kv group) count")
    measure.add_argument("--neuron-step", type=int, default=64, help="measure every k-th FFN neuron count")
    measure.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before measuring")
    measure.add_argument("--attn-implementation", default="sdpa", choices=("eager", "sdpa"))
    measure.add_argument("--output", type=Path, default=None, help="default: the per-machine file in the cache")
    show = commands.add_parser("show", help="summarise a table and check it against this machine")
    show.add_argument("path", type=Path)
    show.add_argument("--threads", type=int, default=None, help="compare against this thread count")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.command == "show":
        table = load_latency_table(args.path)
        print(json.dumps({"machine": table.machine, "model": table.model}, indent=1))
        print(f"heads 0..{len(table.head_latency) - 1}: {table.head_latency[0] * 1e3:.3f} .. "
              f"{table.head_latency[-1] * 1e3:.3f} ms; neurons 0..{len(table.neuron_latency) - 1}: "
              f"+{table.neuron_latency[-1] * 1e3:.3f} ms at full width")
        try:
            check_same_machine(table, table.machine.get("backend", "eager"))
            print("matches this machine")
        except LatencyTableMismatch as error:
            print(f"does not match this machine: {error}")
        return 0

    model = _model_for_measuring(args.model, args.attn_implementation)
    table = measure_latency_table(
        model, batch_size=args.batch_size, seq_len=args.seq_len, backend=args.backend, repeats=args.repeats,
        warmup=args.warmup, head_step=args.head_step, neuron_step=args.neuron_step,
    )
    print(save_latency_table(table, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
