"""The latency lookup table of one transformer layer on one machine: the type, its files, and the machine check.

A table holds, for one model architecture, batch size, sequence length, backend and machine:

- ``head_latency`` [n_heads + 1]: seconds for one layer with h query heads kept and no FFN neurons, h = 0..H.
  It includes the layer's fixed cost (residuals, LayerNorms, output-projection biases), so ``head_latency[0]`` is
  the cost of a layer with nothing left but that (a table may also hold [n_kv_groups + 1] entries, one per
  key/value group);
- ``neuron_latency`` [n_neurons + 1]: the extra seconds that n FFN neurons add to such a layer;
- ``machine``: ``current_machine()`` where it was measured; ``model``: the architecture, when recorded;
  ``measured_heads`` / ``measured_neurons``: the sizes actually timed (the rest interpolated);
  ``measured_neuron_seconds``: the medians timed at ``measured_neurons`` before they were made nondecreasing (the
  steps of a kernel's preferred widths, which that fit would flatten: ``width_choice`` reads them), when recorded.

So ``head_latency[h] + neuron_latency[n]`` estimates a layer with h heads and n neurons, and summing over layers
estimates the stack. Both lists can also be indexed with a tensor of kept counts, as a tensor would be:
``table.head_latency[kept_heads_per_layer].sum()``. ``inc_plugins.perf.layer_latency`` measures tables;
``inc_plugins.post_training.latency_budget`` searches masks under one.

Latency depends on the machine, so ``check_machine`` refuses a table measured with another CPU model, other CPU
flags, another backend or thread count (or another batch size / sequence length, when the caller states one), and
warns about another torch version. Files are JSON, ``FORMAT_VERSION`` 1, one per (model, machine, backend, threads,
batch, sequence length) under ``assets.cache_root() / "latency"``; every table written since format 1 loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inc_plugins.assets import cache_root

from .machine import cpu_description

FORMAT_VERSION = 1
MEASURE_COMMAND = "python -m inc_plugins.latency_table measure"

# Keys that refuse a table when they differ / only warn, each with the other names a table's metadata may use.
_REFUSING_KEYS = {
    "cpu_model": ("cpu_model", "cpu", "processor"),
    "cpu_flags": ("cpu_flags",),
    "backend": ("backend",),
    "num_threads": ("num_threads", "threads", "torch_threads"),
}
_SHAPE_KEYS = ("batch_size", "seq_len")  # refuse when the caller states them and they differ
_WARNING_KEYS = {"torch_version": ("torch_version", "torch")}


class LatencyTableMismatchError(ValueError):
    """The latency table was measured on another machine, backend, thread count or input shape."""


class Seconds(list):
    """A list of latencies in seconds (index = kept units) that a tensor of kept counts can also index, giving a
    float64 tensor of the looked-up latencies."""

    def __getitem__(self, index):
        if isinstance(index, torch.Tensor):
            return torch.tensor(self, dtype=torch.float64)[index]
        return super().__getitem__(index)


def _seconds(name: str, values: Any) -> Seconds:
    flat = torch.as_tensor(values, dtype=torch.float64).flatten().tolist()
    if len(flat) < 2 or any(not v >= 0 or v == float("inf") for v in flat):
        raise ValueError(f"{name} must hold at least 2 finite latencies >= 0 seconds, got {flat[:8]}...")
    return Seconds(flat)


@dataclass(frozen=True)
class LatencyTable:
    """Layer latency in seconds by kept units; see the module docstring for what each entry includes."""

    head_latency: Seconds  # [n_heads + 1] (or [n_kv_groups + 1])
    neuron_latency: Seconds  # [n_neurons + 1]
    machine: dict = field(default_factory=dict)  # current_machine() at measurement time
    model: dict = field(default_factory=dict)  # the architecture (inc_plugins.perf.layer_latency.describe_model)
    measured_heads: list[int] = field(default_factory=list)  # head counts actually timed (the rest interpolated)
    measured_neurons: list[int] = field(default_factory=list)
    measured_neuron_seconds: list[float] = field(default_factory=list)  # raw medians at measured_neurons, if recorded

    def __post_init__(self):
        for name in ("head_latency", "neuron_latency"):
            object.__setattr__(self, name, _seconds(name, getattr(self, name)))
        if self.measured_neuron_seconds and len(self.measured_neuron_seconds) != len(self.measured_neurons):
            raise ValueError(f"measured_neuron_seconds has {len(self.measured_neuron_seconds)} entries, "
                             f"measured_neurons {len(self.measured_neurons)}: one latency per measured width")
        if not isinstance(self.machine, Mapping) or not isinstance(self.model, Mapping):
            raise ValueError(f"a latency table's machine and model metadata must be dicts, got "
                             f"{type(self.machine).__name__} and {type(self.model).__name__}")
        object.__setattr__(self, "machine", dict(self.machine))
        object.__setattr__(self, "model", dict(self.model))


# ------------------------------------------------------------------------------------------------------ machine


def current_machine(backend: str = "eager", batch_size: int | None = None, seq_len: int | None = None) -> dict:
    """What a latency measurement depends on, here and now: CPU model and flags (``machine.cpu_description``),
    architecture, torch version and thread count, the backend name and the input shape."""
    cpu = cpu_description()
    return {
        "cpu_model": cpu["cpu_model"],
        "cpu_flags": dict(cpu["flags"]),
        "architecture": platform.machine(),
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "backend": backend,
        "batch_size": batch_size,
        "seq_len": seq_len,
    }


def _lookup(machine: Mapping[str, Any], aliases: tuple[str, ...]) -> Any:
    for alias in aliases:
        if alias in machine:
            return machine[alias]
    return None


def _flag_differences(measured: Any, here: Any) -> tuple[dict, dict]:
    """The CPU flags a table records that differ here. Only recorded flags count: a table from before a flag was
    added to the description still matches the machine it came from."""
    if not isinstance(measured, Mapping) or not isinstance(here, Mapping):
        return ({"flags": measured}, {"flags": here}) if measured != here else ({}, {})
    differing = [flag for flag in measured if measured[flag] != here.get(flag, False)]
    return {f: measured[f] for f in differing}, {f: here.get(f, False) for f in differing}


def check_machine(table: LatencyTable, current: Mapping[str, Any], allow_foreign: bool = False) -> None:
    """Refuse (``LatencyTableMismatchError``) a table whose CPU model, CPU flags, backend or thread count differ
    from ``current`` (a ``current_machine()``), or whose batch size / sequence length differ where ``current``
    states them; with ``allow_foreign`` only warn. Latencies do not transfer between those, so a search under a
    latency budget would optimise for the wrong machine. Warn about another torch version (same kernels, usually
    similar timings) and about metadata the table lacks (it cannot be checked)."""
    differences, missing = [], []
    for key, aliases in _REFUSING_KEYS.items():
        measured, here = _lookup(table.machine, aliases), _lookup(current, aliases)
        if measured is None:
            if here is not None:
                missing.append(key)
            continue
        if key == "cpu_flags":
            measured, here = _flag_differences(measured, here)
        if measured != here:
            differences.append(f"{key}: table {measured!r}, now {here!r}")
    for key in _SHAPE_KEYS:
        measured, here = table.machine.get(key), current.get(key)
        if here is not None and measured != here:
            differences.append(f"{key}: table {measured!r}, now {here!r}")
    if missing:
        warnings.warn(
            f"the latency table does not record {missing}: cannot check that it was measured on this machine",
            stacklevel=2,
        )
    for key, aliases in _WARNING_KEYS.items():
        measured, here = _lookup(table.machine, aliases), _lookup(current, aliases)
        if measured is not None and measured != here:
            warnings.warn(f"the latency table was measured with torch {measured}, running {here}", stacklevel=2)
    if differences:
        message = "the latency table was measured elsewhere (" + "; ".join(differences) + ")"
        if not allow_foreign:
            raise LatencyTableMismatchError(
                message + ": its latencies do not describe this setup. Measure a table here with "
                f"`{MEASURE_COMMAND}`, or set allow_foreign_latency_table=True to use it anyway"
            )
        warnings.warn(message + "; using it because allow_foreign_latency_table=True", stacklevel=2)


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


def as_latency_table(source: Any) -> LatencyTable:
    """A ``LatencyTable`` from a table, a path (``load_latency_table``), a mapping with keys ``head_latency`` /
    ``neuron_latency`` / ``machine`` (/ ``model`` and the ``measured_*`` lists), or any object with those
    attributes."""
    if isinstance(source, LatencyTable):
        return source
    if isinstance(source, (str, Path)):
        if not Path(source).exists():
            raise FileNotFoundError(f"latency table {str(source)!r} does not exist")
        return load_latency_table(source)
    get = source.get if isinstance(source, Mapping) else lambda key, default=None: getattr(source, key, default)
    head, neuron = get("head_latency"), get("neuron_latency")
    if head is None or neuron is None:
        raise ValueError(
            f"a latency table needs head_latency and neuron_latency (seconds for 0..n kept units of one block), "
            f"got a {type(source).__name__} without them"
        )
    return LatencyTable(head, neuron, get("machine", None) or {}, get("model", None) or {},
                        *(list(get(name, None) or []) for name in ("measured_heads", "measured_neurons",
                                                                   "measured_neuron_seconds")))
