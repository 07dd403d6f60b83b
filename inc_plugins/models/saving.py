"""Save and load physically slimmed transformers models (``surgery_transformers.slim_model``).

Transformers 5 configs cannot describe per-layer sizes, so::

    save_slimmed(model, "out/slim")                  # safetensors + config.json with `inc_slimmed`
    model = inc_plugins.models.saving.load_slimmed("out/slim")

``config.inc_slimmed`` records, per layer, the original indices of the kept query heads and the number of kept FFN
neurons; the config's own sizes stay those of the dense model. A plain ``AutoModel...from_pretrained`` on such a
directory builds the dense architecture and raises a "size mismatch" error for the slimmed weights; with
``ignore_mismatched_sizes=True`` it would silently re-initialise them, so never pass that for a slimmed model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from .surgery_transformers import (
    SLIMMED_CONFIG_KEY,
    SLIMMED_FORMAT_VERSION,
    slim_model,
    slimmed_sizes,
    slimming_adapter,
)



def save_slimmed(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save a slimmed model with ``save_pretrained`` (safetensors) into `directory`, atomically.

    The model is written to a temporary sibling directory that then replaces `directory` by rename, so a reader
    never sees a half-written model (a previous `directory` is moved aside first and deleted after the swap).
    Returns the directory. Load it back with ``load_slimmed``.
    """
    if slimmed_sizes(model) is None:
        raise ValueError(
            f"{type(model).__name__} has no config.{SLIMMED_CONFIG_KEY}: it was not slimmed with slim_model; "
            "save a dense model with save_pretrained"
        )
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        # transformers 5.5 otherwise renames the LayerNorm weight/bias of models loaded with from_pretrained to
        # the legacy gamma/beta, which the strict load in load_slimmed would reject.
        model.save_pretrained(staging, safe_serialization=True, save_original_format=False)
        previous = None
        if directory.exists():
            previous = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
            os.rmdir(previous)
            directory.rename(previous)
        staging.rename(directory)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create module parameters on the meta device (no memory, no init cost); buffers stay real, since
    non-persistent ones (rotary frequencies, position ids) are computed at construction and not saved."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            parameter = module._parameters[name]
            module._parameters[name] = type(parameter)(parameter.to("meta"), requires_grad=parameter.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{directory} has no model.safetensors (or its index): not a saved model")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(directory / name))
    return state


def _model_class(config, model_class):
    if model_class is not None:
        return model_class
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    raise ValueError(
        f"config.architectures = {architectures!r} names no transformers class; pass model_class= "
        "(e.g. transformers.BertForSequenceClassification)"
    )


def _sizes_to_masks(sizes: dict, n_layers: int, n_heads: int, n_neurons: int) -> tuple[torch.Tensor, torch.Tensor]:
    heads, intermediate = sizes.get("heads"), sizes.get("intermediate_size")
    if sizes.get("format") != SLIMMED_FORMAT_VERSION or heads is None or intermediate is None:
        raise ValueError(
            f"unreadable {SLIMMED_CONFIG_KEY} (format {sizes.get('format')!r}, expected {SLIMMED_FORMAT_VERSION})"
        )
    if len(heads) != n_layers or len(intermediate) != n_layers:
        raise ValueError(f"{SLIMMED_CONFIG_KEY} describes {len(heads)} layers, the config has {n_layers}")
    head_mask = torch.zeros(n_layers, n_heads)
    neuron_mask = torch.zeros(n_layers, n_neurons)
    for layer, (kept, width) in enumerate(zip(heads, intermediate)):
        head_mask[layer, list(kept)] = 1.0
        neuron_mask[layer, :width] = 1.0
    return head_mask, neuron_mask


def load_slimmed(directory: str | os.PathLike, model_class=None, attn_implementation: str | None = None) -> nn.Module:
    """Load a model saved by ``save_slimmed``: ``model = inc_plugins.models.saving.load_slimmed(path)``.

    Builds the dense architecture from the saved config with parameters on the meta device, removes the heads and
    neurons recorded in ``config.inc_slimmed`` (so every layer gets its saved size), then loads the safetensors
    weights strictly (every parameter must be in the file or tied to one that is). `model_class` defaults to the
    transformers class named in ``config.architectures``; an ``AutoModel...`` class also works. Returns the model
    in eval mode. `attn_implementation` ("eager", "sdpa", ...) is passed to the model's construction; by default
    transformers picks its usual default.
    """
    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    sizes = getattr(config, SLIMMED_CONFIG_KEY, None)
    if sizes is None:
        raise ValueError(f"{directory}/config.json has no {SLIMMED_CONFIG_KEY}: not a slimmed model, use from_pretrained")
    delattr(config, SLIMMED_CONFIG_KEY)
    cls = _model_class(config, model_class)
    build_kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with _parameters_on_meta():
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            model = cls._from_config(config, **build_kwargs)
        else:  # an AutoModel... class
            model = cls.from_config(config, **build_kwargs)
    adapter = slimming_adapter(model)
    _, blocks = adapter.blocks(model)
    n_neurons = blocks[0].get_submodule(adapter.layout.ffn_out).in_features
    head_mask, neuron_mask = _sizes_to_masks(sizes, len(blocks), adapter.num_heads(model), n_neurons)
    slim_model(model, head_mask, neuron_mask)
    model.config.inc_slimmed = sizes  # keep exactly what was saved

    state = _read_safetensors(directory)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise RuntimeError(f"{directory}: weights not in the slimmed architecture: {result.unexpected_keys[:10]}")
    model.tie_weights()
    still_empty = [name for name, tensor in model.state_dict().items() if tensor.device.type == "meta"]
    if still_empty:
        raise RuntimeError(f"{directory}: weights missing from the checkpoint: {still_empty[:10]}")
    return model.eval()
