"""A compiled OpenVINO token model that is called like the transformers model it came from.

`model(input_ids=..., attention_mask=...)` returns an object with `.logits` (a float32 torch tensor), so the code that
evaluates a PyTorch model (accuracy, perplexity) evaluates the IR unchanged.
"""

from __future__ import annotations

from types import SimpleNamespace

import openvino as ov
import torch
from torch import nn

from .openvino_conversion import LOGITS

# keyword arguments of a transformers forward that change nothing for a logits-only IR (it has no cache)
IGNORED_ARGUMENTS = frozenset({"use_cache"})


class OpenVINOTokenModel(nn.Module):
    """`compiled` (an `openvino.CompiledModel` of `convert_to_openvino`) behind a transformers-like call. An
    nn.Module with no parameters, so `model.eval()` and the project's non-finite checks accept it."""

    def __init__(self, compiled: ov.CompiledModel):
        super().__init__()
        self.compiled = compiled
        self.input_names = [port.get_any_name() for port in compiled.inputs]
        self.request = compiled.create_infer_request()

    @property
    def precision(self) -> str:
        """The inference precision OpenVINO runs with ("f32", "bf16", ...)."""
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()

    def forward(self, **inputs) -> SimpleNamespace:
        unknown = sorted(set(inputs) - set(self.input_names) - IGNORED_ARGUMENTS)
        if unknown:
            raise TypeError(f"this OpenVINO model takes {', '.join(self.input_names)}; got also {', '.join(unknown)}")
        feed = {}
        for name in self.input_names:
            if name in inputs:
                feed[name] = inputs[name].numpy()
            elif name == "attention_mask":  # as transformers does when no mask is given: attend to every token
                feed[name] = torch.ones_like(inputs["input_ids"]).numpy()
            else:
                raise TypeError(f"this OpenVINO model needs input {name!r} (it takes {', '.join(self.input_names)})")
        outputs = self.request.infer(feed)
        logits = outputs[self.compiled.output(LOGITS)]
        return SimpleNamespace(logits=torch.from_numpy(logits.copy()).float())
