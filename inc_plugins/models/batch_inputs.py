"""How one calibration batch becomes one model call, for every kind of batch the pruners accept.

A batch is a dict (keyword arguments; ``labels`` is left out), an ``(inputs, labels)`` tuple or list (the inputs
go in positionally), or a bare tensor.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["batch_inputs", "model_call"]


def batch_inputs(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) of one batch, as given: a dict without its ``labels`` (and ``use_cache``: the cache is the
    pruner's choice, see ``model_call``), the first element of a tuple or list batch (a tensor), or a bare tensor.
    Raises TypeError for other batches."""
    if isinstance(batch, Mapping):
        return (), {key: value for key, value in batch.items() if key not in ("labels", "use_cache")}
    inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    raise TypeError(
        f"calibration batches must be dicts, (inputs, labels) tuples/lists or tensors, got {type(batch).__name__}"
    )


def model_call(model: nn.Module, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) to call ``model`` with on one batch (``batch_inputs``), tensors on the model's device.

    The KV cache is switched off whenever the model's ``forward`` takes ``use_cache``: pruners run each batch once
    for statistics, and a cache would only cost memory (or, replayed block by block, hand the stale keys of earlier
    replays to later calls).
    """
    device = next(model.parameters()).device
    args, kwargs = batch_inputs(batch)
    args = tuple(value.to(device) if isinstance(value, Tensor) else value for value in args)
    kwargs = {key: value.to(device) if isinstance(value, Tensor) else value for key, value in kwargs.items()}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return args, kwargs


def named_batch_tensors(batch: Any) -> Iterator[tuple[str, Tensor]]:
    """(where, tensor) for each tensor of a batch (a tensor, a dict or a tuple/list of tensors), in order; ``where`` is
    "input", "key 'input_ids'" or "element 0", for messages."""
    if isinstance(batch, Tensor):
        yield "input", batch
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            if isinstance(value, Tensor):
                yield f"key {key!r}", value
    elif isinstance(batch, (tuple, list)):
        for position, value in enumerate(batch):
            if isinstance(value, Tensor):
                yield f"element {position}", value
