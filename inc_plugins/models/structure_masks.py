"""Attention-head and FFN-neuron masks of Transformer blocks, applied with forward pre-hooks.

Kwon et al. (2022) put one mask variable on every attention head and every FFN neuron:

* a head's mask multiplies that head's slice of the input of the attention output projection
  (``layout.attention_output``: BERT ``attention.output.dense``, Llama ``self_attn.o_proj``), i.e. its context
  vectors, so a zero removes the head's whole contribution to the block;
* a neuron's mask multiplies that neuron's entry of the input of the FFN down projection (``layout.ffn_out``).

transformers 5 removed the ``head_mask=`` arguments, so the masks are applied here with forward pre-hooks, which
read the mask tensors at call time: a mask that requires grad receives gradients (Fisher importance), and a mask
changed in place takes effect on the next forward pass (layer-wise tuning).

Mask convention (shared with ``inc_plugins.models.surgery_transformers``): float tensors
``head_mask [n_layers, n_heads]`` and ``neuron_mask [n_layers, n_neurons]``; 0 = pruned, any other value = the
unit's scale (1.0 = untouched).

Grouped-query attention (Llama-like decoders with ``num_kv_heads < num_heads``): the prunable unit is a key/value
group, because a key/value head can only be removed together with every query head that reads it. Hooks accept
``head_mask`` either per query head ``[n_layers, n_heads]`` (the shared convention; heads of one group should hold
one value) or per group ``[n_layers, n_kv_heads]``, which is expanded to the group's query heads (query head ``h``
reads key/value head ``h // (n_heads // n_kv_heads)``, as transformers' ``repeat_kv`` does).

Supported families: bert-like (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, MPNet) and llama-like (Llama, Mistral,
Qwen2). Both keep a head-major ``[..., n_heads * head_dim]`` layout at the output projection's input.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from .architectures import ADAPTERS, ArchitectureAdapter, UnsupportedModelError, adapter_for

__all__ = [
    "SUPPORTED_FAMILIES",
    "MaskStructure",
    "MaskHooks",
    "UnitSlice",
    "mask_structure",
    "expand_head_mask",
    "group_head_mask",
    "apply_structure_masks",
    "unit_slices",
    "fold_structure_masks",
]

SUPPORTED_FAMILIES = ("bert-like", "llama-like")


def _supported_model_types() -> str:
    listed = []
    for family in SUPPORTED_FAMILIES:
        types = [name for name, adapter in ADAPTERS.items() if adapter.family == family]
        listed.append(f"{family} ({', '.join(types)})")
    return "; ".join(listed)


@dataclass(frozen=True)
class MaskStructure:
    """Sizes of a model's maskable units; every block must have the same sizes (a dense, unslimmed model).

    ``n_head_units`` is the number of prunable attention units per layer: ``n_heads`` for multi-head attention,
    ``n_kv_heads`` (key/value groups of ``heads_per_unit`` query heads) under grouped-query attention.
    """

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    n_neurons: int

    @property
    def grouped(self) -> bool:
        return self.n_kv_heads < self.n_heads

    @property
    def n_head_units(self) -> int:
        return self.n_kv_heads if self.grouped else self.n_heads

    @property
    def heads_per_unit(self) -> int:
        return self.n_heads // self.n_head_units

    @property
    def pre_norm(self) -> bool:
        """Llama-like blocks normalise before each sub-layer; BERT-like blocks after the residual sum."""
        return self.family == "llama-like"


def _layout_adapter(model: nn.Module) -> ArchitectureAdapter:
    adapter = adapter_for(model)
    if adapter.family not in SUPPORTED_FAMILIES:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise UnsupportedModelError(
            f"{type(model).__name__} (model type {model_type!r}, family {adapter.family!r}) has no head/neuron "
            f"masks; supported families: {_supported_model_types()}"
        )
    return adapter


def _linear(block: nn.Module, name: str, layer: int) -> nn.Linear:
    module = block.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise UnsupportedModelError(f"layer {layer}: {name!r} is a {type(module).__name__}, expected torch.nn.Linear")
    return module


def mask_structure(model: nn.Module) -> MaskStructure:
    """Unit counts of ``model``. Raises UnsupportedModelError for other families or blocks of unequal sizes."""
    adapter = _layout_adapter(model)
    _, blocks = adapter.blocks(model)
    n_heads, n_kv, head_dim = adapter.num_heads(model), adapter.num_kv_heads(model), adapter.head_dim(model)
    if n_heads % n_kv:
        raise UnsupportedModelError(f"{n_heads} query heads cannot be split into {n_kv} key/value groups")
    layout = adapter.layout
    sizes = set()
    for index, block in enumerate(blocks):
        attention_out = _linear(block, layout.attention_output, index)
        ffn_out = _linear(block, layout.ffn_out, index)
        sizes.add((attention_out.in_features, attention_out.out_features, ffn_out.in_features))
    if len(sizes) != 1:
        raise UnsupportedModelError(
            f"blocks differ in size ({sorted(sizes)} as (attention width, hidden, FFN width)): masks need a dense "
            f"model whose blocks all have the same heads and neurons"
        )
    ((attention_width, hidden_size, n_neurons),) = sizes
    if attention_width != n_heads * head_dim:
        raise UnsupportedModelError(
            f"the attention output projection reads {attention_width} features, but the config says "
            f"{n_heads} heads x {head_dim} = {n_heads * head_dim}"
        )
    return MaskStructure(adapter.family, len(blocks), n_heads, n_kv, head_dim, hidden_size, n_neurons)


def expand_head_mask(head_mask: torch.Tensor, structure: MaskStructure) -> torch.Tensor:
    """``head_mask`` per query head ``[n_layers, n_heads]``; a per-group mask ``[n_layers, n_kv_heads]`` is
    repeated over each group's query heads (differentiably), a per-head one is returned as is."""
    expected = {(structure.n_layers, structure.n_heads), (structure.n_layers, structure.n_head_units)}
    if head_mask.dim() != 2 or tuple(head_mask.shape) not in expected:
        raise ValueError(
            f"head_mask must be [n_layers, n_heads] = [{structure.n_layers}, {structure.n_heads}]"
            + (f" or per key/value group [{structure.n_layers}, {structure.n_head_units}]" if structure.grouped else "")
            + f", got {tuple(head_mask.shape)}"
        )
    if head_mask.shape[1] == structure.n_heads:
        return head_mask
    return head_mask.repeat_interleave(structure.heads_per_unit, dim=1)


def group_head_mask(head_mask: torch.Tensor, structure: MaskStructure) -> torch.Tensor:
    """The per-unit mask ``[n_layers, n_head_units]`` of a per-query-head mask. Under grouped-query attention
    every query head of a group must hold the same value (raises ValueError otherwise)."""
    head_mask = expand_head_mask(head_mask, structure)
    groups = head_mask.reshape(structure.n_layers, structure.n_head_units, structure.heads_per_unit)
    if not (groups == groups[..., :1]).all():
        raise ValueError(
            "under grouped-query attention the query heads of one key/value group are pruned and scaled together: "
            "give them one value in head_mask"
        )
    return groups[..., 0]


def _check_neuron_mask(neuron_mask: torch.Tensor, structure: MaskStructure) -> None:
    if tuple(neuron_mask.shape) != (structure.n_layers, structure.n_neurons):
        raise ValueError(
            f"neuron_mask must be [n_layers, n_neurons] = [{structure.n_layers}, {structure.n_neurons}], "
            f"got {tuple(neuron_mask.shape)}"
        )


class MaskHooks:
    """Forward pre-hooks that multiply head contexts and FFN neuron activations by masks.

    ``head_mask`` / ``neuron_mask`` are read at every forward pass: assign new tensors, or change them in place, to
    change the masks; None leaves that kind of unit unmasked. Use as a context manager, or call ``remove()``.
    """

    def __init__(self, model: nn.Module, head_mask: torch.Tensor | None = None, neuron_mask: torch.Tensor | None = None):
        self.structure = mask_structure(model)
        self._head_mask: torch.Tensor | None = None
        self._neuron_mask: torch.Tensor | None = None
        self.head_mask, self.neuron_mask = head_mask, neuron_mask
        adapter = adapter_for(model)
        _, blocks = adapter.blocks(model)
        self._handles = []
        for index, block in enumerate(blocks):
            self._handles.append(
                block.get_submodule(adapter.layout.attention_output).register_forward_pre_hook(self._head_hook(index))
            )
            self._handles.append(block.get_submodule(adapter.layout.ffn_out).register_forward_pre_hook(self._neuron_hook(index)))

    @property
    def head_mask(self) -> torch.Tensor | None:
        return self._head_mask

    @head_mask.setter
    def head_mask(self, mask: torch.Tensor | None) -> None:
        if mask is not None:
            expand_head_mask(mask, self.structure)  # shape check only: expansion happens per call, for autograd
        self._head_mask = mask

    @property
    def neuron_mask(self) -> torch.Tensor | None:
        return self._neuron_mask

    @neuron_mask.setter
    def neuron_mask(self, mask: torch.Tensor | None) -> None:
        if mask is not None:
            _check_neuron_mask(mask, self.structure)
        self._neuron_mask = mask

    def _head_hook(self, layer: int):
        structure = self.structure

        def hook(_module: nn.Module, args: tuple) -> tuple | None:
            if self._head_mask is None:
                return None
            context = args[0]
            scales = expand_head_mask(self._head_mask, structure)[layer].to(context.device, context.dtype)
            per_head = context.unflatten(-1, (structure.n_heads, structure.head_dim)) * scales.unsqueeze(-1)
            return (per_head.flatten(-2), *args[1:])

        return hook

    def _neuron_hook(self, layer: int):
        def hook(_module: nn.Module, args: tuple) -> tuple | None:
            if self._neuron_mask is None:
                return None
            return (args[0] * self._neuron_mask[layer].to(args[0].device, args[0].dtype), *args[1:])

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> MaskHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_structure_masks(
    model: nn.Module, head_mask: torch.Tensor | None = None, neuron_mask: torch.Tensor | None = None
) -> MaskHooks:
    """Hook ``head_mask`` (``[n_layers, n_heads]``, or per key/value group) and ``neuron_mask``
    (``[n_layers, n_neurons]``) into ``model``; returns the hooks (a context manager).

        with apply_structure_masks(model, head_mask, neuron_mask):
            logits = model(**batch).logits
    """
    return MaskHooks(model, head_mask, neuron_mask)


@dataclass(frozen=True)
class UnitSlice:
    """Which rows (``axis="out"``, output features) or columns (``axis="in"``, input features) of one Linear
    layer belong to kept units (``keep`` [features] bool), and their scale (``scale`` [features] float; 0 where
    pruned, 1 where the layer does not carry the units' scales)."""

    name: str
    module: nn.Linear
    axis: str
    keep: torch.Tensor
    scale: torch.Tensor


def unit_slices(model: nn.Module, head_mask: torch.Tensor, neuron_mask: torch.Tensor,
                layers: Collection[int] | None = None) -> list[UnitSlice]:
    """Every Linear row/column range that the masks govern, as ``UnitSlice``s with full module names (of the blocks
    ``layers`` only, when given).

    Heads: the rows of query (per query head) and key/value projections (per key/value head, kept while any query
    head reading it is kept) and the columns of the attention output projection, which carry the scales.
    Neurons: the rows of every ``ffn_in`` layer and the columns of ``ffn_out``, which carry the scales.
    """
    structure = mask_structure(model)
    heads = expand_head_mask(head_mask, structure).detach().float().cpu()
    _check_neuron_mask(neuron_mask, structure)
    neurons = neuron_mask.detach().float().cpu()
    adapter = adapter_for(model)
    prefix, blocks = adapter.blocks(model)
    layout, dh = adapter.layout, structure.head_dim
    slices = []
    for index, block in enumerate(blocks):
        if layers is not None and index not in layers:
            continue
        query_scale = heads[index].repeat_interleave(dh)
        kv_kept = (heads[index] != 0).reshape(structure.n_kv_heads, -1).any(dim=1).float().repeat_interleave(dh)
        governed = [
            (layout.query, "out", query_scale, False),
            (layout.key, "out", kv_kept, False),
            (layout.value, "out", kv_kept, False),
            (layout.attention_output, "in", query_scale, True),
            *((name, "out", neurons[index], False) for name in layout.ffn_in),
            (layout.ffn_out, "in", neurons[index], True),
        ]
        for name, axis, scale, carries_scale in governed:
            keep = scale != 0
            module = _linear(block, name, index)
            slices.append(UnitSlice(f"{prefix}.{index}.{name}", module, axis, keep, scale if carries_scale else keep.float()))
    return slices


@torch.no_grad()
def fold_structure_masks(model: nn.Module, head_mask: torch.Tensor, neuron_mask: torch.Tensor,
                         layers: Collection[int] | None = None) -> list[UnitSlice]:
    """Write the masks into the weights, in place: the model then computes what the hooked model computes (into the
    blocks ``layers`` only, when given: a pruner that prunes block by block).

    Pruned units' rows (query/key/value, FFN input layers: weights and biases) and columns (output projections)
    become 0; kept units' scales multiply their columns of the attention output projection and of ``ffn_out``.
    Returns the ``unit_slices`` written. Folding twice applies the scales twice.
    """
    slices = unit_slices(model, head_mask, neuron_mask, layers)
    for unit in slices:
        weight = unit.module.weight
        scale = unit.scale.to(weight.device, weight.dtype)
        if unit.axis == "out":
            weight.mul_(scale.unsqueeze(1))
            if unit.module.bias is not None:
                unit.module.bias.mul_(scale)
        else:
            weight.mul_(scale.unsqueeze(0))
    return slices

