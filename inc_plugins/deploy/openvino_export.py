"""OpenVINO IR on disk: `openvino_model.xml` + `openvino_model.bin`, written atomically, with the inference precision
it is meant to run at stored in the IR itself.

The precision is stored in the IR's rt_info (`inc_plugins/INFERENCE_PRECISION_HINT`). OpenVINO 2026.4 does not apply
an rt_info precision by itself (its compile_model reads only a few other `runtime_options`), and its CPU plugin runs
bf16 by default wherever the CPU has native bf16: so the precision is passed at load time. `load_openvino(directory)`
reads and passes the stored one, `load_openvino(directory, "fp32")` picks another; with plain openvino:
`core.compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})`.
Weights are stored as they are in float32 (never compressed to fp16), so pruned zeros and every other weight survive
exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import openvino as ov
import torch
from torch import nn

from inc_plugins.atomic import staged_directory

from .openvino_conversion import OpenVINOExportError, convert_to_openvino
from .openvino_model import OpenVINOTokenModel

IR_FILE = "openvino_model.xml"  # its weights: openvino_model.bin beside it
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # the recipe's name -> OpenVINO's INFERENCE_PRECISION_HINT
PRECISION_KEY = ["inc_plugins", "INFERENCE_PRECISION_HINT"]


def _hint(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def write_openvino_ir(converted: ov.Model, directory: str | os.PathLike, precision: str = "fp32") -> Path:
    """Writes `converted` into the new `directory` (an existing one must be empty: nothing is overwritten), with
    `precision` ("fp32" or "bf16") as its inference hint. The files appear together or not at all."""
    hint, directory = _hint(precision), Path(directory)
    converted.set_rt_info(hint, PRECISION_KEY)
    try:
        with staged_directory(directory) as staging:
            ov.save_model(converted, staging / IR_FILE, compress_to_fp16=False)
    except FileExistsError as error:
        raise OpenVINOExportError(f"export directory: {error}") from None
    return directory


def export_openvino(model: nn.Module, example_inputs: dict[str, torch.Tensor], directory: str | os.PathLike,
                    precision: str = "fp32") -> Path:
    """Converts `model` (`convert_to_openvino`: batch and sequence length left free) and writes it as OpenVINO IR
    into `directory` with the inference-precision hint `precision`; returns the directory."""
    _hint(precision)  # a bad precision fails before the conversion's seconds are spent
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise OpenVINOExportError(f"export directory {directory} already exists and is not empty; refusing to "
                                  f"overwrite it: choose a new directory or remove it")
    return write_openvino_ir(convert_to_openvino(model, example_inputs), directory, precision)


def stored_precision(directory: str | os.PathLike) -> str:
    """The inference-precision hint stored in the IR of `directory` ("f32", "bf16")."""
    return ov.Core().read_model(Path(directory) / IR_FILE).get_rt_info(PRECISION_KEY).astype(str)


def load_openvino(directory: str | os.PathLike, precision: str | None = None, threads: int | None = None
                  ) -> OpenVINOTokenModel:
    """The IR of `directory` compiled for the CPU, at its stored precision hint or `precision` ("fp32", "bf16").
    `threads`: OpenVINO's inference threads (default: torch's thread count, so both runtimes use the same cores)."""
    path = Path(directory) / IR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} holds no OpenVINO IR written by export_openvino")
    core = ov.Core()
    model = core.read_model(path)
    hint = _hint(precision) if precision is not None else model.get_rt_info(PRECISION_KEY).astype(str)
    config = {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "INFERENCE_PRECISION_HINT": hint}
    return OpenVINOTokenModel(core.compile_model(model, "CPU", config))
