"""Physically remove pruned attention heads, key/value groups and FFN neurons from transformers models.

Masks follow the convention shared with the mask search and tuning code:

- ``head_mask`` ``[n_layers, n_heads]`` and ``neuron_mask`` ``[n_layers, n_neurons]``, float;
- 0 means pruned, any other value is that unit's scale (1.0 when untuned);
- the masked model multiplies head ``h``'s slice of the attention output projection's *input* by
  ``head_mask[l, h]``, and FFN neuron ``n`` (an input feature of the FFN output projection) by ``neuron_mask[l, n]``.

``slim_model`` turns a masked model into a smaller dense one with the same outputs: pruned heads lose their
query/key/value rows and output-projection columns, pruned neurons their FFN input rows and output column, and the
scales of kept units are folded into the output projections' columns.

Supported families (see ``architectures.py``): bert-like (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, MPNet) and
llama-like (Llama, Mistral, Qwen2). Under grouped-query attention only whole key/value groups can be removed: all
query heads of a group must be pruned together (their scales may differ).

A layer whose heads are all pruned gets a ``PrunedAttention`` in place of its attention module; its attention
output is then just the output projection's bias (zero when it has none), and residuals/LayerNorms still run. A
layer whose neurons are all pruned keeps zero-size FFN Linears (``[0, hidden]`` and ``[hidden, 0]``), whose output
is likewise the FFN output projection's bias.

Saving and loading the smaller models (transformers 5 configs cannot describe per-layer sizes): ``saving.py``.
``config.inc_slimmed`` records, per layer, the original indices of the kept query heads and the number of kept FFN
neurons, and which output projections carry a bias (``output_bias``: FLAP adds them to Llama-like blocks); the
config's own sizes stay those of the dense model.

Limits: models whose layers differ in size cannot use caches that pre-allocate from the config (StaticCache);
the default dynamic cache works.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .architectures import ArchitectureAdapter, UnsupportedModelError, adapter_for
from .output_bias import OUTPUT_BIASES_KEY, output_projections_with_bias

SLIMMED_CONFIG_KEY = "inc_slimmed"
"""Name of the config attribute (and config.json field) that describes a slimmed model's per-layer sizes."""

SLIMMED_FORMAT_VERSION = 1
"""Version of the ``inc_slimmed`` record; ``load_slimmed`` refuses others."""
_SUPPORTED_FAMILIES = ("bert-like", "llama-like")

# Attributes that attention modules of the supported families read (or expose) for their head counts, by meaning.
_QUERY_HEAD_COUNT_ATTRS = ("num_attention_heads", "n_heads", "num_heads")
_KV_HEAD_COUNT_ATTRS = ("num_key_value_heads",)
_ALL_HEAD_SIZE_ATTRS = ("all_head_size",)


class PrunedAttention(nn.Module):
    """Stands in for an attention module whose heads were all removed.

    ``forward(hidden_states, ...)`` returns ``(output, None)`` like the attention modules it replaces, where
    ``output`` is:

    - the owned output projection applied to a zero-width input, i.e. its bias broadcast to
      ``[..., hidden]`` (zeros without bias), when the replaced module held the output projection itself
      (DistilBERT, MPNet, Llama); the projection keeps its attribute name, so state-dict keys stay the same;
    - a zero-width ``[..., 0]`` tensor when the output projection lives in a sibling module (BERT's
      ``attention.output.dense``), which then maps it to its bias.
    """

    def __init__(self, projection_name: str | None = None, projection: nn.Linear | None = None):
        super().__init__()
        self.num_heads = 0
        self.projection_name = projection_name
        if projection_name is not None:
            self.add_module(projection_name, projection)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        empty = hidden_states[..., :0]
        if self.projection_name is None:
            return empty, None
        return getattr(self, self.projection_name)(empty), None


class _SelectPositionBiasHeads:
    """Mixin for attention modules that receive a per-head position bias computed once for all layers
    (MPNet's ``position_bias`` ``[batch, n_heads, q, k]``): keeps the bias of this layer's remaining heads."""

    def forward(self, hidden_states, attention_mask=None, position_bias=None, *args, **kwargs):
        if position_bias is not None:
            kept = torch.as_tensor(self.kept_heads, dtype=torch.long, device=position_bias.device)
            position_bias = position_bias.index_select(1, kept)
        return super().forward(hidden_states, attention_mask, position_bias, *args, **kwargs)


_HEAD_SUBSET_CLASSES: dict[type, type] = {}


def _with_position_bias_selection(module: nn.Module, kept_heads: Sequence[int]) -> None:
    """Make `module` select its kept heads from an incoming position bias (same parameters, same state dict)."""
    base = type(module)
    if base not in _HEAD_SUBSET_CLASSES:
        _HEAD_SUBSET_CLASSES[base] = type(f"HeadSubset{base.__name__}", (_SelectPositionBiasHeads, base), {})
    module.__class__ = _HEAD_SUBSET_CLASSES[base]
    # a plain attribute, not a buffer: from_pretrained would re-create a non-persistent buffer empty (its values lost)
    module.kept_heads = tuple(kept_heads)


def _takes_position_bias(module: nn.Module) -> bool:
    return "position_bias" in inspect.signature(type(module).forward).parameters


@dataclass(frozen=True)
class _LayerPlan:
    """What to keep in one layer: original query-head indices with their scales, FFN neuron indices with theirs."""

    kept_heads: list[int]
    head_scales: torch.Tensor  # [len(kept_heads)]
    kept_neurons: list[int]
    neuron_scales: torch.Tensor  # [len(kept_neurons)]


def _slimmable(adapter: ArchitectureAdapter) -> bool:
    return adapter.family in _SUPPORTED_FAMILIES and adapter.layout is not None and not adapter.layout.fused_qkv


def can_slim(model: nn.Module) -> bool:
    """Whether ``slim_model`` supports ``model``'s family (``slimming_adapter`` without the error)."""
    try:
        return _slimmable(adapter_for(model))
    except UnsupportedModelError:
        return False


def slimming_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter of `model`; UnsupportedModelError unless its family can be slimmed."""
    adapter = adapter_for(model)
    if not _slimmable(adapter):
        raise UnsupportedModelError(
            f"slimming supports the {' and '.join(_SUPPORTED_FAMILIES)} families; "
            f"{type(model).__name__} is {adapter.family}"
        )
    return adapter


def _as_mask(mask, name: str, expected: tuple[int, int], what: str) -> torch.Tensor:
    tensor = torch.as_tensor(mask).detach().to("cpu", torch.float64)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} must have shape [n_layers, {what}] = {list(expected)}, got {list(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf); 0 = pruned, other values are scales")
    return tensor


def _layer_plans(model: nn.Module, adapter: ArchitectureAdapter, head_mask, neuron_mask) -> list[_LayerPlan]:
    _, blocks = adapter.blocks(model)
    n_layers = len(blocks)
    n_heads = adapter.num_heads(model)
    n_kv = adapter.num_kv_heads(model)
    n_neurons = blocks[0].get_submodule(adapter.layout.ffn_out).in_features
    heads = _as_mask(head_mask, "head_mask", (n_layers, n_heads), "n_heads")
    neurons = _as_mask(neuron_mask, "neuron_mask", (n_layers, n_neurons), "n_neurons")
    group_size = n_heads // n_kv
    plans = []
    for layer in range(n_layers):
        kept = heads[layer] != 0
        if group_size > 1:
            groups = kept.reshape(n_kv, group_size)
            split = (groups.any(dim=1) & ~groups.all(dim=1)).nonzero().flatten().tolist()
            if split:
                group = split[0]
                members = list(range(group * group_size, (group + 1) * group_size))
                raise ValueError(
                    f"head_mask layer {layer}: key/value group {group} (query heads {members}) is only partly pruned "
                    f"({heads[layer, members].tolist()}); under grouped-query attention ({n_heads} query heads, "
                    f"{n_kv} key/value heads) all query heads of a group must be pruned together"
                )
        kept_heads = kept.nonzero().flatten().tolist()
        kept_neurons = (neurons[layer] != 0).nonzero().flatten().tolist()
        plans.append(
            _LayerPlan(kept_heads, heads[layer, kept_heads], kept_neurons, neurons[layer, kept_neurons])
        )
    return plans


def _feature_indices(units: Sequence[int], unit_size: int) -> torch.Tensor:
    """Feature indices covered by whole units (heads) of `unit_size` features each."""
    units = torch.as_tensor(list(units), dtype=torch.long)
    return (units[:, None] * unit_size + torch.arange(unit_size)).flatten()


@torch.no_grad()
def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Keep only output features `rows` of `linear` (weight [out, in] rows and bias entries)."""
    rows = rows.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(0, rows), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.index_select(0, rows), requires_grad=linear.bias.requires_grad)
    linear.out_features = len(rows)


@torch.no_grad()
def _keep_columns(linear: nn.Linear, columns: torch.Tensor, scales: torch.Tensor) -> None:
    """Keep only input features `columns` of `linear`, each column multiplied by its scale."""
    columns = columns.to(linear.weight.device)
    weight = linear.weight.index_select(1, columns)
    if not (scales == 1).all():
        weight = weight * scales.to(weight.device, weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    linear.in_features = len(columns)


def _check_linear(module: nn.Module, name: str) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise UnsupportedModelError(f"{name} is a {type(module).__name__}, slimming needs torch.nn.Linear")
    return module


def _parent_name(name: str) -> str:
    return name.rpartition(".")[0]


def _set_attr_if_present(module: nn.Module, names: Sequence[str], value: int) -> None:
    for name in names:
        if hasattr(module, name):
            setattr(module, name, value)


def _slim_attention(block: nn.Module, adapter: ArchitectureAdapter, plan: _LayerPlan, n_heads: int, n_kv: int,
                    head_dim: int) -> None:
    layout = adapter.layout
    attention_name = _parent_name(layout.query)
    attention = block.get_submodule(attention_name)
    output = _check_linear(block.get_submodule(layout.attention_output), layout.attention_output)
    group_size = n_heads // n_kv
    kept_heads = plan.kept_heads
    kept_groups = sorted({head // group_size for head in kept_heads})

    head_features = _feature_indices(kept_heads, head_dim)
    scales = plan.head_scales.repeat_interleave(head_dim)
    _keep_columns(output, head_features, scales)

    if not kept_heads:
        replace_attention(block, adapter, PrunedAttention)
        return

    _keep_rows(_check_linear(block.get_submodule(layout.query), layout.query), head_features)
    kv_features = _feature_indices(kept_groups, head_dim)
    for name in (layout.key, layout.value):
        _keep_rows(_check_linear(block.get_submodule(name), name), kv_features)

    # Head counts that the modeling code reshapes with (BERT: all_head_size; the rest infer it with view(-1));
    # the query heads per key/value group (Llama's num_key_value_groups) do not change.
    _set_attr_if_present(attention, _QUERY_HEAD_COUNT_ATTRS, len(kept_heads))
    _set_attr_if_present(attention, _KV_HEAD_COUNT_ATTRS, len(kept_groups))
    _set_attr_if_present(attention, _ALL_HEAD_SIZE_ATTRS, len(kept_heads) * head_dim)
    if _takes_position_bias(attention) and len(kept_heads) < n_heads:
        _with_position_bias_selection(attention, kept_heads)


def replace_attention(block: nn.Module, adapter: ArchitectureAdapter,
                      stand_in: Callable[[str | None, nn.Linear | None], nn.Module]) -> nn.Module:
    """Put ``stand_in(projection_name, projection)`` in place of ``block``'s attention module (the parent of its
    query projection) and return it. When that module holds the attention output projection (DistilBERT, MPNet,
    Llama), ``projection_name`` is the projection's attribute name and ``projection`` the module, for the stand-in
    to keep under that name (state-dict keys stay the same); else both are None (BERT's projection is the sibling
    ``attention.output.dense``). The stand-in returns ``(output, None)`` as the attention modules do."""
    layout = adapter.layout
    attention_name = _parent_name(layout.query)
    projection_name = projection = None
    if layout.attention_output.startswith(attention_name + "."):
        projection_name = layout.attention_output[len(attention_name) + 1 :]
        if "." in projection_name:
            raise UnsupportedModelError(f"nested output projection {layout.attention_output} is not supported")
        projection = block.get_submodule(layout.attention_output)
    parent_name, _, child_name = attention_name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    replacement = stand_in(projection_name, projection)
    setattr(parent, child_name, replacement)
    return replacement


def _slim_ffn(block: nn.Module, adapter: ArchitectureAdapter, plan: _LayerPlan) -> None:
    layout = adapter.layout
    neurons = torch.as_tensor(plan.kept_neurons, dtype=torch.long)
    for name in layout.ffn_in:
        _keep_rows(_check_linear(block.get_submodule(name), name), neurons)
    _keep_columns(_check_linear(block.get_submodule(layout.ffn_out), layout.ffn_out), neurons, plan.neuron_scales)
    # LlamaMLP records its width; nothing in its forward reads it.
    ffn = block.get_submodule(_parent_name(layout.ffn_out))
    _set_attr_if_present(ffn, ("intermediate_size",), len(plan.kept_neurons))


def _slim_block(block: nn.Module, adapter: ArchitectureAdapter, plan: _LayerPlan, n_heads: int, n_kv: int,
                head_dim: int) -> None:
    _slim_attention(block, adapter, plan, n_heads, n_kv, head_dim)
    _slim_ffn(block, adapter, plan)


def slim_block(
    block: nn.Module,
    adapter: ArchitectureAdapter,
    kept_heads: Sequence[int],
    kept_neurons: Sequence[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    head_scales: torch.Tensor | None = None,
    neuron_scales: torch.Tensor | None = None,
) -> nn.Module:
    """Slim one dense block in place to the given original query-head and FFN-neuron indices, their scales
    (`head_scales` per kept query head, `neuron_scales` per kept neuron, each in ascending index order; None: 1)
    folded into the output projections' columns.

    For measuring blocks of a given size (latency tables) and for running one pruned block at its pruned cost (mask
    tuning); `kept_heads` must cover whole key/value groups. Does not touch any config. Returns `block`.
    """
    if not _slimmable(adapter):
        raise UnsupportedModelError(f"slimming supports the {' and '.join(_SUPPORTED_FAMILIES)} families, not {adapter.family}")
    group_size = num_heads // num_kv_heads
    kept_heads = sorted(kept_heads)
    groups = {head // group_size for head in kept_heads}
    if len(kept_heads) != len(groups) * group_size:
        raise ValueError(f"kept_heads {kept_heads} split a key/value group of {group_size} query heads")
    plan = _LayerPlan(
        kept_heads, torch.ones(len(kept_heads)) if head_scales is None else head_scales,
        sorted(kept_neurons), torch.ones(len(kept_neurons)) if neuron_scales is None else neuron_scales,
    )
    _slim_block(block, adapter, plan, num_heads, num_kv_heads, head_dim)
    return block


def slim_model(model: nn.Module, head_mask, neuron_mask) -> nn.Module:
    """Remove pruned heads and FFN neurons from `model` in place and fold the kept units' scales in.

    head_mask: ``[n_layers, n_heads]`` (query heads), neuron_mask: ``[n_layers, n_neurons]``; 0 = pruned,
    other values = scale. Returns `model`, whose outputs equal those of the masked dense model up to float error.
    Records the kept sizes in ``model.config.inc_slimmed`` (see ``save_slimmed``/``load_slimmed``).

    Raises ValueError for masks of the wrong shape, non-finite values, key/value groups that are only partly
    pruned, or a model that was already slimmed; UnsupportedModelError for other model families.
    """
    adapter = slimming_adapter(model)
    if getattr(model.config, SLIMMED_CONFIG_KEY, None) is not None:
        raise ValueError(
            f"{type(model).__name__} was already slimmed (config.{SLIMMED_CONFIG_KEY} is set); its layers differ in "
            "size, so one rectangular mask cannot describe it. Slim the dense model with the combined masks instead"
        )
    plans = _layer_plans(model, adapter, head_mask, neuron_mask)
    n_heads, n_kv, head_dim = adapter.num_heads(model), adapter.num_kv_heads(model), adapter.head_dim(model)
    _, blocks = adapter.blocks(model)
    layout = adapter.layout
    for block in blocks:  # check everything before changing anything
        for name in (layout.query, layout.key, layout.value, layout.attention_output, *layout.ffn_in, layout.ffn_out):
            _check_linear(block.get_submodule(name), name)
    for block, plan in zip(blocks, plans):
        _slim_block(block, adapter, plan, n_heads, n_kv, head_dim)
    setattr(
        model.config,
        SLIMMED_CONFIG_KEY,
        {
            "format": SLIMMED_FORMAT_VERSION,
            "heads": [plan.kept_heads for plan in plans],
            "intermediate_size": [len(plan.kept_neurons) for plan in plans],
            OUTPUT_BIASES_KEY: output_projections_with_bias(blocks, adapter),
        },
    )
    return model


def slimmed_sizes(model: nn.Module) -> dict | None:
    """``model.config.inc_slimmed`` (kept head indices and FFN sizes per layer), or None for a dense model."""
    return getattr(getattr(model, "config", None), SLIMMED_CONFIG_KEY, None)
