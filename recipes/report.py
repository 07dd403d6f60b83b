"""What a run reports: per-layer sparsity, parameter counts, versions and CPU features."""

from pathlib import Path

import neural_compressor
import torch
import transformers

from inc_plugins.execution.streamed_model import parameter_value
from inc_plugins.perf.machine import machine_description

PRUNABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


# Both counts use torch.count_nonzero, which allocates nothing the size of the weight: `(w != 0).sum()` sums a bool
# tensor as int64 (9 bytes per weight: +0.56 GB on a 32000 x 2048 LM head) and `(w == 0).float()` a float32 copy.


def layer_sparsity(model: torch.nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero weights in every Linear/Conv layer (and transformers' Conv1D); a streamed model's
    weights are read one layer at a time. A layer that slimming emptied (no heads or neurons left: a weight with no
    elements) holds no zeros: 0.0, as every other slimmed layer."""
    sparsity = {}
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE) or type(module).__name__ == "Conv1D":
            weight = parameter_value(model, f"{name}.weight")
            sparsity[name] = (weight.numel() - int(torch.count_nonzero(weight))) / max(weight.numel(), 1)
    return sparsity


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(parameter_value(model, name))) for name, _ in model.named_parameters())
    return {"total": total, "nonzero": nonzero}


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")


def weights_bytes(directory: Path) -> int:
    """Bytes of the weight files a saved model directory holds (config and tokenizer files not counted)."""
    return sum(path.stat().st_size for pattern in WEIGHT_FILES for path in Path(directory).glob(pattern))


def environment() -> dict:
    """Library versions and the machine (``inc_plugins.perf.machine``): the CPU model, its flags (True/False each)
    and torch's thread count."""
    machine = machine_description()
    return {
        "python": machine["python"],
        "torch": machine["torch"],
        "transformers": transformers.__version__,
        "neural_compressor": neural_compressor.__version__,
        "cpu": machine["cpu_model"],
        "cpu_count": machine["torch_threads"],  # torch's threads (the name is the report's, kept for old readers)
        "logical_cpus": machine["logical_cpus"],
        "cpu_features": machine["flags"],
    }
