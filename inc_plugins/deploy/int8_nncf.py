"""Static int8 post-training quantization of an OpenVINO model with NNCF (`nncf.quantize`).

NNCF's transformer preset: weights int8, symmetric, one scale per output channel (so a zero weight is the int8 zero,
whatever its scale), activations int8 with ranges calibrated on the given samples; SmoothQuant rescales weights by
input channel before that, which keeps zeros zero too. `zeros_kept_in_ir` (pruned_zeros) reads the result to check.
"""

from __future__ import annotations

import nncf
import openvino as ov
import torch


def calibration_items(batches: list[dict[str, torch.Tensor]]) -> list[dict]:
    """One NNCF item per sample (NNCF calibrates best with batch 1), right padding cut off where an attention mask
    says where it starts, as numpy arrays named like the model's inputs."""
    items = []
    for batch in batches:
        for row in range(len(batch["input_ids"])):
            length = int(batch["attention_mask"][row].sum()) if "attention_mask" in batch else batch["input_ids"].shape[1]
            items.append({name: tensor[row : row + 1, :length].numpy() for name, tensor in batch.items()})
    return items


def quantize_ir_int8(converted: ov.Model, calibration: list[dict[str, torch.Tensor]]) -> ov.Model:
    """`converted` (`convert_to_openvino`) with static int8 weights and activations, calibrated on every sample of the
    `calibration` batches (model inputs; their order is the calibration's, so a seeded draw makes it reproducible)."""
    items = calibration_items(calibration)
    if not items:
        raise ValueError("int8 quantization needs calibration data: got no samples")
    return nncf.quantize(converted, nncf.Dataset(items), subset_size=len(items), model_type=nncf.ModelType.TRANSFORMER)
