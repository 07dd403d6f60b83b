"""How the export and quantize stages check a deployed form of the model (an OpenVINO IR, an int8 model): evaluated on
the task's data beside the PyTorch model, whose logits the evaluation after pruning kept (`RecordedOutputs`)."""

import torch

from inc_plugins.deploy import ComparedModel, OutputComparison, Tolerance, compare_outputs


def evaluated_beside(task, candidate: torch.nn.Module, reference: torch.nn.Module, desc: str, pytorch_metrics: dict,
                     tolerance: Tolerance) -> OutputComparison:
    """`candidate` evaluated by `task` (progress labelled `desc`), its logits compared batch by batch with
    `reference`'s (the PyTorch model, or its `RecordedOutputs`) and its metrics with `pytorch_metrics`."""
    compared = ComparedModel(candidate, reference)
    metrics = task.evaluate(compared, desc=desc)
    return compare_outputs(compared, pytorch_metrics, metrics, tolerance)
