"""Do the weights that pruning zeroed stay zero in a quantized model? Read back from what the quantizer produced: the
int8 (or float) constants of an OpenVINO model, or the int8 weights of a torch-quantized one."""

from __future__ import annotations

import numpy as np
import openvino as ov
import torch
from torch import nn


def _pruned_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> zero mask of every 2-D Linear weight of `model` that holds a zero."""
    return {name: module.weight.detach() == 0 for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module.weight.dim() == 2 and bool((module.weight == 0).any())}


def _matched(pruned: dict[str, torch.Tensor], candidates: list[tuple[torch.Tensor, bool]]) -> dict:
    """Each pruned weight's zeros against the first unused candidate (zero mask, whether it is int8) of its shape whose
    zeros contain them all (or, when none does, the one that keeps the most): {layers, layers_int8, zeros,
    zeros_kept, all_kept, layers_losing_zeros}; `layers_int8` counts the pruned layers found quantized."""
    used, zeros, kept, int8, losing = set(), 0, 0, 0, []
    for name, mask in pruned.items():
        best, best_kept = None, -1
        for index, (candidate_zeros, _) in enumerate(candidates):
            if index in used or candidate_zeros.shape != mask.shape:
                continue
            overlap = int((mask & candidate_zeros).sum())
            if overlap > best_kept:
                best, best_kept = index, overlap
            if overlap == int(mask.sum()):
                break
        if best is not None:
            used.add(best)
            int8 += candidates[best][1]
        zeros += int(mask.sum())
        kept += max(best_kept, 0)
        if best_kept < int(mask.sum()):
            losing.append(name)
    return {"layers": len(pruned), "layers_int8": int8, "zeros": zeros, "zeros_kept": kept, "all_kept": not losing,
            "layers_losing_zeros": losing}


def _weight_constant(op) -> bool:
    """A 2-D float constant, or an int8 one (NNCF's quantized weights; symmetric, so a zero weight is stored as 0)."""
    if op.get_type_name() != "Constant" or len(op.get_output_shape(0)) != 2:
        return False
    element = op.get_output_element_type(0)
    return element.is_real() or element.get_type_name() == "i8"


def zeros_kept_in_ir(model: nn.Module, quantized: ov.Model) -> dict:
    """`model`'s pruned Linear weights against the 2-D constants of its quantized OpenVINO model (int8 where NNCF
    quantized the layer, float where it did not)."""
    candidates = [(torch.from_numpy(np.asarray(op.get_data()) == 0), op.get_output_element_type(0).get_type_name() == "i8")
                  for op in quantized.get_ops() if _weight_constant(op)]
    return _matched(_pruned_weights(model), candidates)


def zeros_kept_in_quantized_torch(model: nn.Module, quantized: nn.Module) -> dict:
    """`model`'s pruned Linear weights against the int8 weights of a torch-quantized copy (e.g. INC's), and the
    float weights of the layers it left unquantized."""
    candidates = []
    for module in quantized.modules():
        weight = getattr(module, "weight", None)
        weight = weight() if callable(weight) else weight  # quantized Linear: a method returning a quantized tensor
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            values = weight.int_repr() if weight.is_quantized else weight.detach()
            candidates.append((values == 0, weight.is_quantized))
    return _matched(_pruned_weights(model), candidates)
