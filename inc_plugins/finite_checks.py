"""Non-finite values (NaN, Inf) stop a pruning run where a pruner first sees them, naming where they are.

A NaN weight or calibration input does not make a pruner fail by itself: ranks, APoZ counts and
misclassification rates are computed on NaN without complaint, and the run prunes at random. Each pruner
therefore checks what it reads: the model's parameters before it starts, each calibration batch as it is read,
and the activations, outputs, losses or gradients it collects, and raises ``NonFiniteError`` with one line that
says which layer, which kind of value, how many NaN/Inf, and what to do.

Training loops (``check_training_loss`` on each step's loss, ``check_trained_weights`` once per epoch) and
evaluations (``check_metric``, ``check_outputs``) stop the same way, naming the step or the metric and the
model's first non-finite weight.

Each check is ``torch.isfinite(t).all()`` per tensor (a large tensor piece by piece, so a check holds a few MB more,
not a copy of the tensor); the NaN/Inf counts are only computed on failure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from inc_plugins.models.batch_inputs import named_batch_tensors

__all__ = [
    "NonFiniteError",
    "CHECK_MODEL_AND_DATA",
    "check_tensor",
    "check_parameters",
    "check_batch",
    "first_non_finite_parameter",
    "check_model_and_calibration",
    "check_training_loss",
    "check_trained_weights",
    "check_metric",
    "check_outputs",
]

CHECK_MODEL_AND_DATA = "check the model file and the calibration data"
CHECK_DATA = "check the calibration data"
CHECK_MODEL = "check the model file (or the training that produced it)"


class NonFiniteError(ValueError):
    """NaN or Inf values where a pruner, an evaluation or a training loop reads them.

    ``layer``: qualified module name (None when the values are not a layer's, e.g. a calibration batch);
    ``kind``: "weight", "bias", "input activation", "output activation", "calibration input", "loss", ...;
    ``nan`` / ``inf``: how many values are NaN / +-Inf (None when not counted).
    """

    def __init__(self, message: str, *, layer: str | None = None, kind: str | None = None,
                 nan: int | None = None, inf: int | None = None):
        super().__init__(message)
        self.layer, self.kind, self.nan, self.inf = layer, kind, nan, inf


# elements checked at once: torch.isfinite builds an absolute-value copy and three bool tensors of its input's
# size (~5 bytes per bf16 weight: +0.3 GB on a 32000 x 2048 embedding), so large tensors are checked piece by piece
_CHECK_CHUNK = 1 << 22


def _is_finite(tensor: Tensor) -> bool:
    if not tensor.is_floating_point() and not tensor.is_complex():
        return True  # integer and bool tensors cannot hold NaN or Inf
    if tensor.dim() == 0 or tensor.numel() <= _CHECK_CHUNK:
        return bool(torch.isfinite(tensor).all())
    rows = max(1, _CHECK_CHUNK // (tensor.numel() // tensor.shape[0]))  # pieces along dim 0: views, never copies
    return all(bool(torch.isfinite(piece).all()) for piece in tensor.split(rows))


def _counts(tensor: Tensor) -> tuple[int, int]:
    return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())


def _holds(tensor: Tensor) -> str:
    nan, inf = _counts(tensor)
    return f"holds {nan} NaN and {inf} Inf of {tensor.numel()} values"


def check_tensor(tensor: Tensor, layer: str | None, kind: str, during: str, hint: str = CHECK_MODEL_AND_DATA,
                 error: type[NonFiniteError] = NonFiniteError) -> None:
    """Raise ``error`` (NonFiniteError or a subclass) if ``tensor`` (``layer``'s ``kind``: "weight", "input
    activation", ...) holds NaN or Inf. ``during`` says who read it (e.g. "Wanda calibration, block 1").
    ``layer`` None: values that are no layer's; ``kind`` then names them alone (e.g. "the model's logits")."""
    if _is_finite(tensor):
        return
    nan, inf = _counts(tensor)
    subject = f"{kind} of layer {layer!r}" if layer is not None else kind
    raise error(
        f"{subject} holds {nan} NaN and {inf} Inf of {tensor.numel()} values ({during}): {hint}",
        layer=layer, kind=kind, nan=nan, inf=inf,
    )


def _parameter_kind(attribute: str) -> str:
    return attribute if attribute in ("weight", "bias") else f"parameter {attribute!r}"


def _named_values(model: nn.Module, prefix: str = "") -> Iterable[tuple[str, str, Tensor]]:
    """(qualified name, kind, tensor): every parameter, then the running statistics of BatchNorm layers (other
    buffers may hold -inf on purpose, e.g. attention masks). Meta tensors (a streamed model's blocks not loaded)
    hold no values and are left out."""
    for name, parameter in model.named_parameters(prefix=prefix):
        if parameter.is_meta:
            continue
        yield name, _parameter_kind(name.rpartition(".")[2]), parameter.detach()
    for module_name, module in model.named_modules(prefix=prefix):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for attribute in ("running_mean", "running_var"):
                buffer = getattr(module, attribute, None)
                if isinstance(buffer, Tensor):
                    yield f"{module_name}.{attribute}", f"BatchNorm {attribute}", buffer


def _first_non_finite(model: nn.Module, prefix: str = "") -> tuple[str, str, Tensor] | None:
    with torch.no_grad():
        return next(((name, kind, tensor) for name, kind, tensor in _named_values(model, prefix)
                     if not _is_finite(tensor)), None)


def check_parameters(model: nn.Module, during: str, prefix: str = "", hint: str = CHECK_MODEL) -> None:
    """Raise NonFiniteError naming the first parameter (in ``named_parameters`` order) or BatchNorm running
    statistic of ``model`` that holds NaN or Inf. ``prefix``: the qualified name of ``model`` in a larger model."""
    found = _first_non_finite(model, prefix)
    if found is not None:
        name, kind, tensor = found
        check_tensor(tensor, name.rpartition(".")[0] or "(the model itself)", kind, during, hint)


def first_non_finite_parameter(model: nn.Module) -> str | None:
    """Qualified name of the first parameter (or BatchNorm running statistic) holding NaN or Inf, with its counts,
    e.g. ``"model.layers.0.mlp.down_proj.weight (holds 1 NaN and 0 Inf of 8192 values)"``; None when all are
    finite."""
    found = _first_non_finite(model)
    return None if found is None else f"{found[0]} ({_holds(found[2])})"


def check_batch(batch: Any, index: int, during: str) -> None:
    """Raise NonFiniteError if a floating tensor of calibration batch ``index`` (a tensor, a dict or a tuple/list
    of tensors) holds NaN or Inf."""
    for where, tensor in named_batch_tensors(batch):
        if not _is_finite(tensor):
            nan, inf = _counts(tensor)
            raise NonFiniteError(
                f"calibration batch {index} ({where}) holds {nan} NaN and {inf} Inf of {tensor.numel()} values "
                f"({during}): {CHECK_DATA}",
                kind="calibration input", nan=nan, inf=inf,
            )


def check_model_and_calibration(model: nn.Module, dataloader: Any, during: str) -> None:
    """The model's parameters, then every calibration batch (when ``dataloader`` can be read twice: a list, a
    DataLoader; a one-shot iterator is left alone, since reading it here would empty it for the pruner).

    For pruners this package hands over without seeing the values itself (INC's ``sparse_gpt``)."""
    check_parameters(model, during)
    if dataloader is None or isinstance(dataloader, Iterator):
        return
    for index, batch in enumerate(dataloader):
        check_batch(batch, index, during)


# --- training and evaluation ---------------------------------------------------------------------------------

TRAINING_HINT = "check the learning rate, weight_decay and the training data"


def _first_weight(model: nn.Module, when_finite: str) -> str:
    return first_non_finite_parameter(model) or when_finite


def _layer_of(model: nn.Module) -> str | None:
    found = _first_non_finite(model)
    return None if found is None else found[0].rpartition(".")[0]


def check_training_loss(model: nn.Module, loss: float, step: int, during: str = "training") -> None:
    """Raise NonFiniteError when the loss of training step ``step`` (a Python float, e.g. ``loss.item()``, which
    training loops read anyway: the check costs nothing more) is NaN or Inf, naming the first non-finite weight."""
    if math.isfinite(loss):
        return
    first = _first_weight(model, "none (the weights are finite: the batch, or an overflow in the model)")
    raise NonFiniteError(
        f"{during} stopped at step {step}: the loss is {loss}; first non-finite weight: {first}; {TRAINING_HINT}",
        kind="loss",
    )


def check_trained_weights(model: nn.Module, step: int, during: str = "training") -> None:
    """Raise NonFiniteError naming the first parameter that holds NaN or Inf after training step ``step`` (one
    ``isfinite`` per parameter: call it once per epoch, or at the end of training)."""
    first = first_non_finite_parameter(model)
    if first is not None:
        raise NonFiniteError(
            f"{during} stopped after step {step}: the weights hold NaN/Inf; first non-finite weight: {first}; "
            f"{TRAINING_HINT}",
            layer=_layer_of(model), kind="weight",
        )


def check_metric(model: nn.Module, name: str, value: float, subject: str = "the model") -> None:
    """Raise NonFiniteError when an evaluation metric (``name``, e.g. "perplexity") of ``subject`` (e.g. "the dense
    model") is NaN or Inf, naming the model's first non-finite weight."""
    if math.isfinite(value):
        return
    first = _first_weight(model, "none (the weights are finite: the evaluation data, or an overflow in the model)")
    raise NonFiniteError(
        f"{subject}'s {name} is {value}: a weight or the evaluation data holds NaN/Inf; first non-finite weight: "
        f"{first}",
        kind=name,
    )


def check_outputs(model: nn.Module, outputs: Tensor, what: str, subject: str = "the model",
                  batch: int | None = None) -> None:
    """Raise NonFiniteError when evaluation outputs (``what``, e.g. "logits") hold NaN or Inf: metrics such as
    accuracy stay finite on them (argmax ranks NaN silently). Names the model's first non-finite weight."""
    if _is_finite(outputs):
        return
    nan, inf = _counts(outputs)
    where = f" on evaluation batch {batch}" if batch is not None else ""
    first = _first_weight(model, "none (the weights are finite: the evaluation data, or an overflow in the model)")
    raise NonFiniteError(
        f"{subject}'s {what} hold {nan} NaN and {inf} Inf of {outputs.numel()} values{where}: a weight or the "
        f"evaluation data holds NaN/Inf; first non-finite weight: {first}",
        kind=what, nan=nan, inf=inf,
    )
