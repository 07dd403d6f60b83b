"""The recipe's `quantize:` stage: static int8 post-training quantization of the final model (NNCF on the OpenVINO IR,
INC 3.7.1 on the PyTorch model), each evaluated beside the float PyTorch model and checked to keep pruned zeros."""

from dataclasses import asdict
from pathlib import Path

import torch

from inc_plugins.deploy import convert_to_openvino, load_openvino
from inc_plugins.deploy.int8_inc import quantize_pytorch_int8_inc
from inc_plugins.deploy.int8_nncf import quantize_ir_int8
from inc_plugins.deploy.openvino_export import write_openvino_ir
from inc_plugins.deploy.pruned_zeros import zeros_kept_in_ir, zeros_kept_in_quantized_torch

from .deployed_check import evaluated_beside
from .export_stage import LOAD_IR
from .schema import Export, Quantize

INT8_DIR = "openvino_int8"  # in the run directory


def _checked(task, candidate: torch.nn.Module, reference: torch.nn.Module, desc: str, pytorch_metrics: dict,
             settings: Quantize) -> dict:
    comparison = evaluated_beside(task, candidate, reference, desc, pytorch_metrics, settings.tolerance())
    if not comparison.within_tolerance:
        print(f"  {desc}: outside the int8 tolerance: {'; '.join(comparison.failures)}")
    return {"evaluated_on": task.evaluated_on, **comparison.as_dict()}


def _nncf(task, model, reference, settings: Quantize, calibration: list[dict], precision: str, directory: Path,
          final: Path, pytorch_metrics: dict) -> dict:
    quantized = quantize_ir_int8(convert_to_openvino(model, task.export_example()), calibration)
    zeros = zeros_kept_in_ir(model, quantized)
    write_openvino_ir(quantized, directory, precision)
    ir = load_openvino(directory)
    return {"ran": True, "what": "nncf.quantize of the OpenVINO IR (transformer preset)", "directory": INT8_DIR,
            "precision": precision, "runs_at": ir.precision,
            "bytes": {path.name: path.stat().st_size for path in sorted(directory.iterdir())},
            "pruned_zeros": zeros,
            "check": _checked(task, ir, reference, "evaluate int8 IR (NNCF)", pytorch_metrics, settings),
            "load": LOAD_IR.format(path=final / INT8_DIR, precision=ir.precision)}


def _inc(task, model, reference, settings: Quantize, calibration: list[dict], pytorch_metrics: dict) -> dict:
    try:
        quantized = quantize_pytorch_int8_inc(model, calibration)
    except Exception as error:  # INC failing on a model family is a finding to report, not a reason to lose the run
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        print(f"  INC post-training quantization failed: {message}")
        return {"ran": False, "error": message[:500]}
    return {"ran": True, "what": "neural_compressor.quantization.fit, PostTrainingQuantConfig(approach='static') "
                                 "(torch.ao FX, x86 backend); evaluated in PyTorch, not saved",
            "pruned_zeros": zeros_kept_in_quantized_torch(model, quantized),
            "check": _checked(task, quantized, reference, "evaluate int8 PyTorch (INC)", pytorch_metrics, settings)}


def quantize_and_check(task, model: torch.nn.Module, reference: torch.nn.Module, settings: Quantize,
                       export: Export | None, staging: Path, final: Path, pytorch_metrics: dict) -> dict:
    """Quantizes `model` with each of `settings.methods` on the task's calibration data, each checked beside
    `reference` (`model`, or its recorded logits); returns what report.json records. The NNCF IR goes to
    `staging`/openvino_int8 (`final` is where the run directory will be)."""
    calibration = task.calibration_inputs(settings)
    report = {"calibration_samples": sum(len(batch["input_ids"]) for batch in calibration), "seed": settings.seed,
              "tolerance": asdict(settings.tolerance()), "methods": {}}
    for method in settings.methods:
        if method == "nncf":
            precision = export.precision if export is not None else "fp32"
            report["methods"]["nncf"] = _nncf(task, model, reference, settings, calibration, precision,
                                              staging / INT8_DIR, final, pytorch_metrics)
        else:
            report["methods"]["inc"] = _inc(task, model, reference, settings, calibration, pytorch_metrics)
    return report
