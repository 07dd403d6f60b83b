"""Save and load physically slimmed transformers models (``surgery_transformers.slim_model``).

    save_slimmed(model, "out/slim")   # safetensors + config.json: model type inc_slimmed_<family>, `inc_slimmed`
    model = AutoModelForCausalLM.from_pretrained("out/slim")   # after `import inc_plugins` (``slimmed_auto``)

``config.inc_slimmed`` records, per layer, the original indices of the kept query heads and the number of kept FFN
neurons; the config's own sizes stay those of the dense model. ``load_slimmed`` is a thin alias of ``from_pretrained``
that also reads directories saved before the model type existed (their config names the dense family's type).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn
from transformers import AutoConfig, PreTrainedModel

from .slimmed_auto import slimmed_class, slimmed_config, slimmed_model_type
from .surgery_transformers import SLIMMED_CONFIG_KEY, slimmed_sizes



LOAD_NOTE_KEY = "inc_plugins_load"  # config.json: how to load the directory, for a reader without the package


def save_slimmed(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save a slimmed model with ``save_pretrained`` (safetensors) into `directory`, atomically.

    The model is written to a temporary sibling directory that then replaces `directory` by rename, so a reader
    never sees a half-written model (a previous `directory` is moved aside first and deleted after the swap).
    Returns the directory. Load it back with ``from_pretrained`` (or ``load_slimmed``).
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
        config_file = staging / "config.json"  # the family's slimmed model type: from_pretrained knows it
        saved = json.loads(config_file.read_text())
        saved["model_type"] = slimmed_model_type(saved["model_type"])
        saved[LOAD_NOTE_KEY] = (f"per-layer sizes: `import inc_plugins` (the inc-plugins package) registers model type "
                                f"{saved['model_type']!r}, then AutoModel...from_pretrained loads it")
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
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


def _slimmed_class(config, model_class):
    """The class ``load_slimmed`` loads with: an Auto class as given, or the slimmed class of a transformers class
    (given, or named first in ``config.architectures``)."""
    if model_class is not None and not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        return model_class  # an AutoModel... class: it maps the slimmed config to its class
    names = [model_class.__name__] if model_class is not None else list(getattr(config, "architectures", None) or [])
    found = [slimmed_class(name) for name in names if slimmed_class(name) is not None]
    if not found:
        raise ValueError(f"config.architectures = {names!r} names no model class slimming supports; pass "
                         f"model_class= (e.g. transformers.AutoModelForSequenceClassification)")
    return found[0]


def load_slimmed(directory: str | os.PathLike, model_class=None, attn_implementation: str | None = None) -> nn.Module:
    """Load a model saved by ``save_slimmed`` (``from_pretrained`` with its slimmed config), in eval mode.

    `model_class`: an ``AutoModel...`` class or a transformers class (default: the one ``config.architectures``
    names). `attn_implementation` ("eager", "sdpa", ...) is passed on; by default transformers picks its usual one.
    """
    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    if getattr(config, SLIMMED_CONFIG_KEY, None) is None:
        raise ValueError(f"{directory}/config.json has no {SLIMMED_CONFIG_KEY}: not a slimmed model, use from_pretrained")
    config = slimmed_config(config)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return _slimmed_class(config, model_class).from_pretrained(directory, config=config, **kwargs).eval()
