"""Slimmed models load with plain ``from_pretrained``: transformers' Auto classes know them after ``import inc_plugins``.

Each slimmable family gets a model type of its own, ``inc_slimmed_<family>`` (``inc_slimmed_llama``,
``inc_slimmed_bert``, ...): its config class is the family's, and its model classes are the family's, built dense and
slimmed to the sizes recorded in ``config.inc_slimmed`` (kept query heads and FFN neurons per layer, and the output
projections that carry a bias) before the weights are loaded. ``saving.save_slimmed`` writes that model type into config.json, so

    import inc_plugins
    model = AutoModelForCausalLM.from_pretrained("run/model")           # a slimmed decoder
    model = AutoModelForSequenceClassification.from_pretrained("run/model")  # a slimmed encoder

Without the package, transformers refuses such a directory with its own error naming the model type, rather than
building the dense architecture and re-initialising what does not fit; no remote code is ever involved.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .architectures import SLIMMED_PREFIX
from .output_bias import OUTPUT_BIASES_KEY, add_output_biases
from .surgery_transformers import SLIMMED_CONFIG_KEY, SLIMMED_FORMAT_VERSION, slim_model, slimming_adapter

__all__ = ["SLIMMABLE_MODEL_TYPES", "register_slimmed_classes", "slimmed_class", "slimmed_config", "slimmed_model_type"]

SLIMMABLE_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "llama", "mistral", "qwen2")
_AUTO_CLASSES = (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForMaskedLM,
                 AutoModelForTokenClassification, AutoModelForQuestionAnswering)


_SLIMMED_CLASSES: dict[str, type] = {}  # by the name of the transformers class each extends


def slimmed_model_type(model_type: str) -> str:
    """The model type of a slimmed model of family ``model_type`` (itself when it is one already)."""
    return model_type if model_type.startswith(SLIMMED_PREFIX) else f"{SLIMMED_PREFIX}{model_type}"


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


def _slim_to_recorded_sizes(model: nn.Module) -> None:
    """Slim a freshly built dense model to the sizes its config records (``slim_model`` refuses a config that has
    them already: it records them itself)."""
    sizes = getattr(model.config, SLIMMED_CONFIG_KEY, None)
    if sizes is None:
        raise ValueError(f"a {model.config.model_type} config needs {SLIMMED_CONFIG_KEY} (the slimmed sizes per layer)")
    delattr(model.config, SLIMMED_CONFIG_KEY)
    try:
        adapter = slimming_adapter(model)
        _, blocks = adapter.blocks(model)
        n_neurons = blocks[0].get_submodule(adapter.layout.ffn_out).in_features
        # from_pretrained builds the model within a meta-device context; the masks and indices are real values
        with torch.device("cpu"):
            slim_model(model, *_sizes_to_masks(sizes, len(blocks), adapter.num_heads(model), n_neurons))
            # biases the family's config cannot describe (FLAP's compensation on Llama-like blocks)
            add_output_biases(blocks, sizes.get(OUTPUT_BIASES_KEY, ()))
    finally:
        setattr(model.config, SLIMMED_CONFIG_KEY, sizes)  # exactly what was saved


def _slimmed_model_class(base: type, config_class: type) -> type:
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        _slim_to_recorded_sizes(self)

    return type(f"IncSlimmed{base.__name__}", (base,), {"config_class": config_class, "__init__": __init__,
                                                          "__module__": __name__})


def _registered_config_classes() -> dict[str, type]:
    return {model_type: CONFIG_MAPPING[slimmed_model_type(model_type)] for model_type in SLIMMABLE_MODEL_TYPES
            if slimmed_model_type(model_type) in CONFIG_MAPPING}


def register_slimmed_classes() -> None:
    """Register each slimmable family's ``inc_slimmed_<family>`` config and model classes with transformers' Auto
    classes (once; ``import inc_plugins`` does it)."""
    for model_type in SLIMMABLE_MODEL_TYPES:
        slimmed_type = slimmed_model_type(model_type)
        if slimmed_type in CONFIG_MAPPING:
            continue
        base_config = CONFIG_MAPPING[model_type]
        config_class = type(f"IncSlimmed{base_config.__name__}", (base_config,),
                            {"model_type": slimmed_type, "__module__": __name__})
        AutoConfig.register(slimmed_type, config_class)
        for auto in _AUTO_CLASSES:
            try:
                base_model = auto._model_mapping[base_config]
            except KeyError:
                continue  # (the family has no model for this task)
            if base_model.__name__ not in _SLIMMED_CLASSES:
                _SLIMMED_CLASSES[base_model.__name__] = _slimmed_model_class(base_model, config_class)
            auto.register(config_class, _SLIMMED_CLASSES[base_model.__name__])


def slimmed_class(class_name: str) -> type | None:
    """The registered slimmed model class of transformers class ``class_name`` (``LlamaForCausalLM``, or
    ``IncSlimmedLlamaForCausalLM`` itself), or None."""
    return _SLIMMED_CLASSES.get(class_name.removeprefix("IncSlimmed"))


def slimmed_config(config):
    """``config`` as its family's slimmed config class (the same values), for a model whose config records slimmed
    sizes; ValueError for a family that cannot be slimmed."""
    classes = _registered_config_classes()
    base_type = config.model_type.removeprefix(SLIMMED_PREFIX)
    if base_type not in classes:
        raise ValueError(f"model type {config.model_type!r} cannot be slimmed; slimming supports "
                         f"{', '.join(SLIMMABLE_MODEL_TYPES)}")
    if isinstance(config, classes[base_type]):
        return config
    values = config.to_dict()
    values.pop("model_type", None)
    return classes[base_type].from_dict(values)
