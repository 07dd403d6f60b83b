"""What oneDNN's kernels actually ran: its verbose output (``ONEDNN_VERBOSE=1``), probed and parsed.

oneDNN prints one line per executed primitive naming its implementation, e.g. ``brg_matmul:avx512_core_amx`` (AMX
tiles) or ``brg_matmul:avx512_core_bf16`` (AVX512-BF16, no AMX). ``run_onednn_probe`` runs a small workload in a
fresh process with verbose mode on; ``parse_onednn_verbose`` turns the lines into kernels and ISAs. A report calls
a number "AMX" only when these kernels used an AMX ISA in the environment that produced it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

# oneDNN names ISAs in implementation names like "brg_matmul:avx512_core_amx", "jit:avx2", "brgconv:avx512_core"
_ISA_PATTERN = re.compile(r"\b(avx10_\w+|avx512_\w+|avx2_vnni_2|avx2_vnni|avx2|avx|sse41|amx_\w+)\b")
_SRC_DTYPE_PATTERN = re.compile(r"\bsrc[_:]([a-z0-9]+)")

# The probe's workload: a bf16 matmul (oneDNN under autocast), an fp32 convolution (oneDNN) and an fp32 Linear
# (which eager PyTorch sends to MKL/ATen, so it prints no oneDNN line: absent lines are information too).
_PROBE_WORKLOAD = """
import torch
torch.manual_seed(0)
x, linear = torch.randn(128, 384), torch.nn.Linear(384, 1536)
with torch.no_grad():
    linear(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear(x)
    torch.nn.functional.conv2d(torch.randn(1, 32, 28, 28), torch.randn(64, 32, 3, 3), padding=1)
"""

# IPEX bundles its own oneDNN build: what its optimized bf16 Linear ran on is probed separately
_IPEX_PROBE_WORKLOAD = """
import torch
import intel_extension_for_pytorch as ipex
torch.manual_seed(0)
x, model = torch.randn(128, 384), torch.nn.Sequential(torch.nn.Linear(384, 1536)).eval()
with torch.no_grad():
    optimized = ipex.optimize(model, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        optimized(x)
"""


def parse_onednn_verbose(text: str) -> dict:
    """oneDNN version, detected ISA, runtime threads and the kernels executed, from oneDNN verbose output.

    Accepts oneDNN 3.x lines (`onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core_amx,...`) and
    2.x lines (`onednn_verbose,exec,cpu,...` or `dnnl_verbose,exec,cpu,...`); other lines are ignored. Graph-API
    lines are skipped: their kernels appear again as primitive lines. Each distinct (primitive, implementation,
    source dtype) becomes one kernel entry with a call count; `isa` is None when the implementation names no ISA
    (e.g. `gemm:jit`, `ref:any`)."""
    version = isa_info = runtime = threads = None
    kernels: dict[tuple, dict] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith(("onednn_verbose,", "dnnl_verbose,")):
            continue
        fields = line.split(",")
        if match := re.search(r"oneDNN (v[\d.]+)", line):
            version = match.group(1)
        if ",info,cpu," in line:  # the gpu engine has info lines of its own ("runtime:none")
            if match := re.search(r",isa:(.*)$", line):  # the ISA text itself may contain commas
                isa_info = match.group(1)
            for field in fields:
                if field.startswith("runtime:"):
                    runtime = field[len("runtime:"):]
                elif field.startswith("nthr:") and field[len("nthr:"):].isdigit():
                    threads = int(field[len("nthr:"):])
        if "exec" not in fields or "graph" in fields[: fields.index("exec")]:
            continue
        at = fields.index("exec")
        if len(fields) < at + 6:
            continue
        engine, primitive, implementation, descriptors = fields[at + 1], fields[at + 2], fields[at + 3], fields[at + 5]
        isa_match = _ISA_PATTERN.search(implementation)
        dtype_match = _SRC_DTYPE_PATTERN.search(descriptors)
        key = (engine, primitive, implementation, dtype_match.group(1) if dtype_match else None)
        entry = kernels.setdefault(key, {"engine": engine, "primitive": primitive, "implementation": implementation,
                                         "isa": isa_match.group(1) if isa_match else None, "src_dtype": key[3],
                                         "calls": 0})
        entry["calls"] += 1
    isas = sorted({k["isa"] for k in kernels.values() if k["isa"]})
    return {"version": version, "isa_info": isa_info, "runtime": runtime, "threads": threads,
            "kernels": list(kernels.values()), "isas_used": isas, "amx_used": any("amx" in isa for isa in isas)}


def run_onednn_probe(python: str = sys.executable, timeout_s: float = 120, ipex: bool = False) -> str:
    """Raw oneDNN verbose output of a small bf16 matmul + fp32 convolution (`ipex`: of an `ipex.optimize`d bf16
    Linear instead), run in a fresh `python` process (verbose mode must be set before oneDNN initialises, and its
    lines go to the process's stdout)."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "DNNL_VERBOSE": "1"}
    workload = _IPEX_PROBE_WORKLOAD if ipex else _PROBE_WORKLOAD
    done = subprocess.run([python, "-c", workload], env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"oneDNN probe failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout
