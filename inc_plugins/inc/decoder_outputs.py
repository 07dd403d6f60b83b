"""Lets INC's SparseGPT driver run on transformers 5.x decoders without editing INC.

INC 3.7.1's `SparseGPTPruning` reads `layer(...)[0]` as the hidden states. transformers 5 decoder layers return a
Tensor, so `[0]` silently takes the first sequence of the batch and the next layer receives a wrong shape.
Wrapping each layer's forward so that it always returns a tuple restores the contract INC expects.
INC also replays each layer twice with the keyword arguments it captured, so a captured KV cache would grow
between replays: the cache is switched off while INC runs.

The driver runs at construction when given a dataloader, and again in each ``on_train_begin(dataloader)`` (INC's own
tests call both): both run within ``sparse_gpt_run``, the adapter plus a NaN check of the model and data.
"""

import contextlib
import functools

import torch
from neural_compressor.compression.pruner.pruning import SparseGPTPruning
from neural_compressor.compression.pruner.utils import get_layers

from ..finite_checks import check_model_and_calibration


def _tuple_forward(forward):
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        out = forward(*args, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    return wrapped


@contextlib.contextmanager
def tuple_layer_outputs(model: torch.nn.Module):
    """Within the block, every layer of the ModuleList that INC's SparseGPT walks returns a tuple, and the
    model's KV cache is off."""
    layers = list(get_layers(model))
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False
    for layer in layers:
        layer.forward = _tuple_forward(layer.forward)
    try:
        yield
    finally:
        for layer in layers:
            # The wrapper lives in the instance dict; deleting it restores the class's forward.
            layer.__dict__.pop("forward", None)
        if use_cache:
            config.use_cache = use_cache


@contextlib.contextmanager
def sparse_gpt_run(model: torch.nn.Module, dataloader):
    """Where INC's SparseGPT driver runs: the model and calibration data checked for NaN first (INC's solves would
    spread one through every weight), then ``tuple_layer_outputs(model)``."""
    check_model_and_calibration(model, dataloader, "sparse_gpt")
    with tuple_layer_outputs(model):
        yield


def adapt_on_train_begin(pruning: SparseGPTPruning, model: torch.nn.Module) -> None:
    """``pruning.on_train_begin(dataloader)`` runs within ``sparse_gpt_run``."""
    on_train_begin = pruning.on_train_begin

    @functools.wraps(on_train_begin)
    def adapted(dataloader=None):
        with sparse_gpt_run(model, dataloader):
            return on_train_begin(dataloader)

    pruning.on_train_begin = adapted
