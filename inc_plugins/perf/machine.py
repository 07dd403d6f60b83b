"""The one description of the machine a number was measured on: CPU, flags, torch's threads and ISA, oneDNN.

Two sources, each read by a pure parser that is tested against recorded samples (tests/data/):

* ``/proc/cpuinfo``: the CPU model, the core/thread topology and the flags of ``CPU_FLAGS`` (what the kernel says the
  CPU can run);
* oneDNN's verbose output (``inc_plugins.perf.onednn``): which ISA its kernels actually used.

A CPU flag says what could run; the verbose lines say what did. Nothing here assumes a feature: a flag is True only
when the kernel lists it, and AMX is claimed only when the tile flag and an AMX compute flag are both listed.
Reports, latency tables, the benchmark suites and the studies all record ``machine_description()`` (or, for a
latency table, the part of it that latency depends on), so every number says where it came from.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import subprocess
from functools import cache
from pathlib import Path

import torch

from .onednn import parse_onednn_verbose, run_onednn_probe

CPU_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx512_fp16", "avx_vnni",
             "avx2")
"""The /proc/cpuinfo flags every description records (True or False each): the ISAs CPU inference kernels pick."""
AMX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8")


def parse_cpuinfo(text: str) -> dict:
    """CPU model, topology and ``CPU_FLAGS`` from the text of /proc/cpuinfo.

    ``logical_cpus`` counts ``processor`` entries; ``physical_cores`` counts distinct (physical id, core id) pairs
    when the kernel reports them (VMs sometimes do not: then None). ``amx`` is True only when the tile flag and at
    least one AMX compute flag are present. ``cpu_model`` is "unknown" when no entry names one."""
    processors = [block for block in re.split(r"\n\s*\n", text.strip()) if block.strip()]
    if not processors or "processor" not in processors[0]:
        raise ValueError("not /proc/cpuinfo text: no 'processor' entry found")
    entries = []
    for block in processors:
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        entries.append(fields)
    first = entries[0]
    flags = set(first.get("flags", "").split())
    cores = {(e["physical id"], e["core id"]) for e in entries if "physical id" in e and "core id" in e}
    flag_table = {flag: flag in flags for flag in CPU_FLAGS}
    return {
        "cpu_model": first.get("model name", "unknown"),
        "logical_cpus": len(entries),
        "physical_cores": len(cores) or None,
        "flags": flag_table,
        "amx": flag_table["amx_tile"] and (flag_table["amx_bf16"] or flag_table["amx_int8"]),
    }


@cache
def cpu_description() -> dict:
    """``parse_cpuinfo`` of this machine. Where /proc/cpuinfo is missing or names no model (non-Linux, some ARM
    kernels), the model is the platform's processor or machine name and, without the file, every flag is False."""
    try:
        cpu = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except (OSError, ValueError):
        cpu = {"cpu_model": "unknown", "logical_cpus": os.cpu_count(), "physical_cores": None,
               "flags": dict.fromkeys(CPU_FLAGS, False), "amx": False}
    if cpu["cpu_model"] == "unknown":
        cpu["cpu_model"] = platform.processor() or platform.machine() or "unknown"
    return cpu


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the platform has none). A measurement records them; it
    never claims the machine was quiet."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def amx_summary(cpu: dict, *onednn_probes: dict | None) -> str:
    """One line for reports: whether AMX is present, and whether the probed oneDNN kernels used it."""
    present = [flag for flag in AMX_FLAGS if cpu["flags"].get(flag)]
    if not cpu["amx"]:
        return "no AMX (CPU flags lack " + ", ".join(f for f in AMX_FLAGS if f not in present) + ")"
    probes = [probe for probe in onednn_probes if probe is not None]
    if not probes:
        return "AMX present (" + ", ".join(present) + "); oneDNN kernels not probed"
    isas = sorted({isa for probe in probes for isa in probe["isas_used"]})
    used = "used by oneDNN kernels" if any(p["amx_used"] for p in probes) else "present but NOT used by oneDNN kernels"
    return f"AMX {used} (" + ", ".join(present) + "; kernels: " + ", ".join(isas or ["none"]) + ")"


@cache
def onednn_probes() -> dict:
    """{onednn, onednn_ipex, onednn_probe_error}: what oneDNN's kernels ran in a fresh process of this Python
    (torch's oneDNN; IPEX's own build where IPEX is installed). Probed once per process: it takes seconds."""
    onednn = onednn_ipex = probe_error = None
    try:
        onednn = parse_onednn_verbose(run_onednn_probe())
        if importlib.util.find_spec("intel_extension_for_pytorch") is not None:
            onednn_ipex = parse_onednn_verbose(run_onednn_probe(ipex=True))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        probe_error = f"{type(error).__name__}: {error}"
    return {"onednn": onednn, "onednn_ipex": onednn_ipex, "onednn_probe_error": probe_error}


def machine_description(probe_onednn: bool = False) -> dict:
    """This machine and this process: ``cpu_description()`` (model, topology, flags, amx), the architecture, Python
    and torch versions, torch's thread count and ATen CPU capability; with ``probe_onednn``, also the oneDNN probe
    (``onednn_probes``) and an ``amx_summary`` line that accounts for it."""
    cpu = cpu_description()
    description = {
        **cpu,
        "flags": dict(cpu["flags"]),
        "architecture": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
    }
    probes = onednn_probes() if probe_onednn else {}
    description.update(probes)
    description["amx_summary"] = amx_summary(cpu, probes.get("onednn"), probes.get("onednn_ipex"))
    return description
