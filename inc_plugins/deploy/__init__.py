"""Deployment of a (pruned, slimmed) model: OpenVINO IR export, int8 post-training quantization, and the check that
the deployed model computes what the PyTorch model computes.

    from inc_plugins.deploy import export_openvino, load_openvino
    export_openvino(model, {"input_ids": ids, "attention_mask": mask}, "out/openvino", precision="bf16")
    ir = load_openvino("out/openvino")        # ir(input_ids=..., attention_mask=...).logits, as the PyTorch model

Only torch, openvino and nncf are imported here: the package takes any token model (dense, masked or slimmed, whose
layers differ in size), so `perf` (the benchmark backends) converts through it too.
"""

from .openvino_conversion import OpenVINOExportError, TokensToLogits, convert_to_openvino
from .openvino_export import PRECISIONS, export_openvino, load_openvino, stored_precision
from .openvino_model import OpenVINOTokenModel
from .output_comparison import (DEFAULT_TOLERANCES, ComparedModel, OutputComparison, RecordedOutputs, Tolerance,
                                compare_outputs)

__all__ = ["DEFAULT_TOLERANCES", "PRECISIONS", "OpenVINOExportError", "ComparedModel", "OpenVINOTokenModel",
           "OutputComparison", "RecordedOutputs", "Tolerance", "TokensToLogits", "compare_outputs", "convert_to_openvino",
           "export_openvino", "load_openvino", "stored_precision"]
