"""A PyTorch token model -> an `openvino.Model`, through `torch.export.export` and `openvino.convert_model`.

The one conversion path of the project (the benchmark backends and the IR export both use it). Why this path:
`openvino.convert_model(module, example_input=...)` traces with TorchScript, which fails on transformers 5 models
("Couldn't get TorchScript module by tracing"), and optimum-intel's export rebuilds the model from its config, which
cannot describe a slimmed model whose layers differ in size. `torch.export` traces the module as it is.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import openvino as ov
import torch
from torch import nn

LOGITS = "logits"  # the name of the IR's one output


class OpenVINOExportError(RuntimeError):
    """A model that cannot be converted or written as OpenVINO IR; the message names the step that failed."""


class TokensToLogits(nn.Module):
    """Positional token tensors (in the order of `input_names`) -> the model's logits: the flat signature
    `torch.export` needs. Decoders run without a key/value cache, so the logits are the only output."""

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model, self.input_names = model, list(input_names)
        self.options = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        output = self.model(**dict(zip(self.input_names, tensors)), **self.options)
        return output.logits if hasattr(output, LOGITS) else output


@contextlib.contextmanager
def _without_pytree_notice():
    """torch 2.13's own export code (and OpenVINO's reading of it) trips a deprecation notice of torch's pytree
    module on every export: nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        yield


@contextlib.contextmanager
def _zero_width_linears_as_what_they_compute(model: nn.Module):
    """While exporting, each Linear with no output features returns its empty output without a matrix product, and
    each with no input features returns its bias (or zeros), broadcast. Slimming leaves such Linears where a layer
    kept no FFN neuron ([0, hidden] and [hidden, 0]) or no head (BERT's attention output projection, [hidden, 0]);
    OpenVINO's CPU plugin cannot build an inner product with an output of width 0, and NNCF's bias correction fails
    on an input of width 0. The outputs are the same tensors."""
    replaced = []  # (module, the forward its instance held before, if any: a hook or wrapper a user set)
    for module in model.modules():
        if isinstance(module, nn.Linear) and 0 in (module.in_features, module.out_features):
            replaced.append((module, module.__dict__.get("forward")))
            module.forward = _empty_output if module.out_features == 0 else _bias_only(module)
    try:
        yield
    finally:
        for module, own_forward in replaced:
            if own_forward is None:
                del module.forward  # the class's forward again
            else:
                module.forward = own_forward


def _empty_output(inputs: torch.Tensor) -> torch.Tensor:
    return inputs[..., :0]


def _bias_only(linear: nn.Linear):
    def forward(inputs: torch.Tensor) -> torch.Tensor:
        shape = (*inputs.shape[:-1], linear.out_features)
        if linear.bias is None:
            return inputs.new_zeros(shape)
        return linear.bias.expand(shape)
    return forward


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else '(no message)'}"[:300]


def convert_to_openvino(model: nn.Module, example_inputs: dict[str, torch.Tensor], dynamic: bool = True) -> ov.Model:
    """`model` (eval mode; its weights as they are, zeros and slimmed sizes included) as an `openvino.Model` whose
    inputs are named like the keys of `example_inputs` ([batch, sequence] integer tensors) and whose output is named
    "logits".

    `dynamic`: batch and sequence length stay free in the IR (torch.export's `Dim.AUTO`); else the IR is specialised
    to the example's shapes (what a benchmark of one shape wants). torch.export specialises any dimension of size 1,
    so a dynamic export needs an example of at least 2 x 2."""
    names = list(example_inputs)
    if not names or any(not isinstance(value, torch.Tensor) or value.dim() != 2 for value in example_inputs.values()):
        shapes = {name: tuple(getattr(value, "shape", ())) for name, value in example_inputs.items()}
        raise OpenVINOExportError(f"example_inputs must map input names to [batch, sequence] tensors, got {shapes}")
    if dynamic and any(size < 2 for value in example_inputs.values() for size in value.shape):
        shape = tuple(next(iter(example_inputs.values())).shape)
        raise OpenVINOExportError(f"a dynamic export needs example inputs of at least batch 2 x sequence 2 (torch.export "
                                  f"fixes a dimension of size 1 for good); got {shape}")
    family = type(model).__name__
    args = tuple(example_inputs.values())
    dynamic_shapes = ((({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},) * len(args)),) if dynamic else None
    try:
        with torch.no_grad(), _without_pytree_notice(), _zero_width_linears_as_what_they_compute(model):
            exported = torch.export.export(TokensToLogits(model.eval(), names), args, dynamic_shapes=dynamic_shapes)
    except Exception as error:  # torch.export raises many types; the first line says what it could not trace
        raise OpenVINOExportError(f"cannot export {family} to OpenVINO: torch.export.export could not trace it "
                                  f"({_first_line(error)})") from error
    try:
        with _without_pytree_notice():
            converted = ov.convert_model(exported)
    except Exception as error:
        raise OpenVINOExportError(f"cannot export {family} to OpenVINO: openvino.convert_model failed on the traced "
                                  f"graph ({_first_line(error)})") from error
    for port, name in zip(converted.inputs, names):
        port.get_tensor().set_names({name})
    converted.outputs[0].get_tensor().set_names({LOGITS})
    return converted
