"""What a run reports: per-layer sparsity, parameter counts, versions and CPU features."""

import platform
from pathlib import Path

import torch

PRUNABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


def layer_sparsity(model: torch.nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero weights in every Linear/Conv layer (and transformers' Conv1D)."""
    return {
        name: (module.weight == 0).float().mean().item()
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE) or type(module).__name__ == "Conv1D"
    }


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {"total": total, "nonzero": nonzero}


CPU_FLAGS = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu_features() -> dict[str, bool]:
    """Flags the kernel reports in /proc/cpuinfo (False everywhere when it cannot be read)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        flags = set()
    return {flag: flag in flags for flag in CPU_FLAGS}


def environment() -> dict:
    import neural_compressor
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "neural_compressor": neural_compressor.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": torch.get_num_threads(),
        "cpu_features": cpu_features(),
    }
