"""The recipe's `export:` stage: the final model as OpenVINO IR in the run directory, checked against the PyTorch
model on the task's evaluation data."""

from pathlib import Path

import torch

from inc_plugins.deploy import export_openvino, load_openvino

from .deployed_check import evaluated_beside
from .recipe_base import RecipeError
from .schema import Export

EXPORT_DIR = "openvino"  # in the run directory

# what the summary shows a reader (`tokenizer`: the one saved with the model): `{path}` the IR directory, `{precision}`
# OpenVINO's hint, which has to be passed (see inc_plugins.deploy.openvino_export)
LOAD_IR = ('import openvino as ov\n'
           'model = ov.Core().compile_model("{path}/openvino_model.xml", "CPU", {{"INFERENCE_PRECISION_HINT": '
           '"{precision}"}})\n'
           'logits = model(dict(tokenizer(["some text"], return_tensors="np")))["logits"]')


def export_and_check(task, model: torch.nn.Module, reference: torch.nn.Module, settings: Export, directory: Path,
                     final: Path, pytorch_metrics: dict) -> dict:
    """Writes `model` as IR into `directory` (the run's staging path; `final` is where it will be), runs it over the
    task's evaluation data beside `reference` (`model`, or its recorded logits), and returns what report.json
    records. RecipeError past the tolerance."""
    export_openvino(model, task.export_example(), directory, settings.precision)
    ir = load_openvino(directory)
    comparison = evaluated_beside(task, ir, reference, "evaluate OpenVINO IR", pytorch_metrics, settings.tolerance())
    if not comparison.within_tolerance:
        raise RecipeError(f"the OpenVINO IR ({settings.precision}) does not compute what the PyTorch model computes: "
                          f"{'; '.join(comparison.failures)}; the IR is in {directory}. Raise export.max_relative_logit_diff "
                          f"or export.metric_tolerance only if the difference is expected")
    return {"format": settings.format, "directory": EXPORT_DIR, "precision": settings.precision,
            "runs_at": ir.precision, "input_names": ir.input_names,
            "bytes": {path.name: path.stat().st_size for path in sorted(directory.iterdir())},
            "check": {"evaluated_on": task.evaluated_on, **comparison.as_dict()},
            "load": LOAD_IR.format(path=final / EXPORT_DIR, precision=ir.precision)}
