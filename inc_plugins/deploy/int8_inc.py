"""Static int8 post-training quantization of a PyTorch model with Intel Neural Compressor 3.7.1.

INC 3.7.1 has two PyTorch paths for static int8, and with torch 2.13 only the older one runs:
- the 3.x API (`neural_compressor.torch.quantization.prepare(model, StaticQuantConfig())`) goes through IPEX when it
  is installed (IPEX 2.8 needs torch 2.8) and otherwise through torch's PT2E quantizer, which torch 2.13 no longer
  ships: `ModuleNotFoundError: No module named 'torch.ao.quantization.quantizer'` (it moved to torchao);
- the 2.x API, `neural_compressor.quantization.fit(model, PostTrainingQuantConfig(approach="static"))`, quantizes
  with torch.ao's FX mode (x86 backend: int8 weights symmetric per output channel, uint8 activations), tracing each
  submodule it can when the whole transformers model does not trace. That is the path used here.
The result is a PyTorch model with quantized Linear layers (torch's own int8 kernels); it cannot be exported to
OpenVINO (use `int8_nncf` for a deployable int8 IR).
"""

from __future__ import annotations

import copy
import tempfile

import torch
from neural_compressor.config import PostTrainingQuantConfig, options
from neural_compressor.quantization import fit
from torch import nn


class _CalibrationLoader:
    """What INC's PyTorch adaptor reads: (inputs, label) pairs and a `batch_size`."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches = batches
        self.batch_size = len(batches[0]["input_ids"])

    def __iter__(self):
        for batch in self.batches:
            yield batch, None


def quantize_pytorch_int8_inc(model: nn.Module, calibration: list[dict[str, torch.Tensor]]) -> nn.Module:
    """A quantized copy of `model` (the model itself is left as it is), calibrated on every sample of the
    `calibration` batches (model inputs)."""
    if not calibration:
        raise ValueError("int8 quantization needs calibration data: got no batches")
    samples = sum(len(batch["input_ids"]) for batch in calibration)
    previous = options.workspace
    # INC writes its tuning history into its workspace (./nc_workspace by default): keep it out of the user's folder
    with tempfile.TemporaryDirectory(prefix="inc-plugins-inc-workspace-") as workspace:
        options.workspace = workspace
        try:
            quantized = fit(copy.deepcopy(model).eval(), PostTrainingQuantConfig(
                approach="static", calibration_sampling_size=[samples]), calib_dataloader=_CalibrationLoader(calibration))
        finally:
            options.workspace = previous
    if quantized is None:  # fit returns None when no configuration could be quantized
        raise RuntimeError(f"INC's post-training quantization found no configuration for {type(model).__name__}")
    return quantized.model.eval()
