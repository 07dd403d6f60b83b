"""Physical surgery on plain CNNs and MLPs: remove pruned channels and hidden neurons, or zero them in place.

- ``slim_cnn_channels(model, keep)``: physical removal of network slimming's channels. For each pruned BN channel
  the producing convolution loses the output filter (and bias), the BN loses the channel (scale, shift, running
  statistics), and the consumer loses the matching input: the next convolution's input channel, or the
  classifier's input features after (global) pooling and flattening (``in_features = channels * positions``,
  channel-major). Supported structures: an ``nn.Sequential`` (nested Sequentials allowed) of conv-BN-activation
  blocks, and models with an ``nn.Sequential`` ``features``, pooling/flatten children and a ``classifier`` (Linear
  or Sequential), such as the project's tiny CNN or VGG-style networks, i.e. structures whose execution order is
  their registration order. Grouped convolutions and residual connections are not supported.
- ``mask_bn_channels(model, keep)``: the same pruning without changing shapes: zero the producing filters and
  the BN's ``gamma`` and ``beta``, so the channel outputs exactly zero. A slimmed model computes the same
  function as the masked one (in eval mode; activations between BN and consumer must map 0 to 0).
- ``slim_mlp_neurons(model, keep)``: the same for the hidden neurons of an ``nn.Sequential`` MLP (network trimming's
  neurons): a pruned neuron loses its weight row and bias entry, and its column in the next Linear.

Which channels to prune is chosen elsewhere (``inc_plugins.algorithms.bn_slimming``, ``...algorithms.apoz``);
transformer heads and neurons are removed by ``surgery_transformers``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .activations import activation_kind
from .cnn_structure import conv_bn_pairs, leaf_modules

_BatchNorm = nn.modules.batchnorm._BatchNorm


class UnsupportedCNNError(ValueError):
    """A model whose structure ``slim_cnn_channels`` cannot follow."""


# --- masking -------------------------------------------------------------------------------------------------


def _check_keep(name: str, mask: Tensor, channels: int) -> Tensor:
    mask = torch.as_tensor(mask).bool().flatten().cpu()
    if mask.numel() != channels:
        raise ValueError(f"keep mask for {name!r} has {mask.numel()} entries, the layer has {channels} channels")
    if not mask.any():
        raise ValueError(f"keep mask for {name!r} removes every channel; keep at least one")
    return mask


@torch.no_grad()
def mask_bn_channels(model: nn.Module, keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Zero the pruned channels in place: BN ``gamma`` and ``beta``, and the producing layer's output filters and
    bias. ``keep``: {BN name: keep mask [C]}. Returns {producer name: keep mask in the weight's layout (bool)}."""
    producers = {bn: producer for producer, bn in conv_bn_pairs(model).items()}
    weight_masks = {}
    for bn_name, mask in keep.items():
        bn = model.get_submodule(bn_name)
        if not isinstance(bn, _BatchNorm):
            raise ValueError(f"{bn_name!r} is a {type(bn).__name__}, not a BatchNorm layer")
        mask = _check_keep(bn_name, mask, bn.num_features)
        channel = mask.to(bn.weight.device)
        bn.weight.mul_(channel)
        if bn.bias is not None:
            bn.bias.mul_(channel)
        producer_name = producers.get(bn_name)
        if producer_name is None:
            continue
        producer = model.get_submodule(producer_name)
        rows = channel.to(producer.weight.device).reshape(-1, *([1] * (producer.weight.dim() - 1)))
        weight_mask = rows.expand_as(producer.weight).clone()
        producer.weight.mul_(weight_mask)
        if producer.bias is not None:
            producer.bias.mul_(channel.to(producer.bias.device))
        weight_masks[producer_name] = weight_mask
    return weight_masks


# --- physical removal ---------------------------------------------------------------------------------------

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_NEUTRAL = (nn.Identity, nn.Flatten, nn.modules.dropout._DropoutNd)


def _structure_leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaves in execution order, for the supported structures; raises UnsupportedCNNError otherwise."""
    if isinstance(model, nn.Sequential):
        containers = [model]
    elif isinstance(getattr(model, "features", None), nn.Sequential):
        containers = [model.features]
        for name, child in model.named_children():
            if name in ("features", "classifier"):
                continue
            if next(child.children(), None) is not None or not isinstance(child, (*_POOLS, *_NEUTRAL)):
                raise UnsupportedCNNError(
                    f"{type(model).__name__}.{name} ({type(child).__name__}) is neither pooling, flatten nor dropout: "
                    f"slim_cnn_channels only follows features -> pooling -> classifier models and nn.Sequential"
                )
        classifier = getattr(model, "classifier", None)
        if not isinstance(classifier, (nn.Linear, nn.Sequential)):
            raise UnsupportedCNNError(
                f"{type(model).__name__} needs a Linear or Sequential `classifier` for slim_cnn_channels"
            )
        if isinstance(classifier, nn.Sequential):
            containers.append(classifier)
    else:
        raise UnsupportedCNNError(
            f"slim_cnn_channels supports nn.Sequential CNNs and models with an nn.Sequential `features` followed by "
            f"pooling and a `classifier`; got {type(model).__name__}"
        )
    for container in containers:
        for name, module in container.named_modules():
            if next(module.children(), None) is not None and not isinstance(module, nn.Sequential):
                raise UnsupportedCNNError(
                    f"{type(module).__name__} inside the model has its own forward (e.g. a residual block): "
                    f"slim_cnn_channels only follows Sequential conv-BN-activation structures"
                )
    return leaf_modules(model)


@torch.no_grad()
def _maps_zero_to_zero(module: nn.Module, channels: int) -> bool:
    return bool((module(torch.zeros(1, channels, 1, 1)) == 0).all())


def _slimming_plan(model: nn.Module, bn_name: str, channels: int) -> tuple[str, str]:
    """(producer conv name, consumer name) around ``bn_name``; raises UnsupportedCNNError explaining what breaks."""
    leaves = _structure_leaves(model)
    index = next((i for i, (name, _) in enumerate(leaves) if name == bn_name), None)
    if index is None:
        raise ValueError(f"{bn_name!r} is not a BatchNorm layer of {type(model).__name__}")
    if index == 0 or not isinstance(leaves[index - 1][1], nn.Conv2d):
        raise UnsupportedCNNError(f"BatchNorm {bn_name!r} does not directly follow a Conv2d")
    producer_name, producer = leaves[index - 1]
    if producer.groups != 1 or producer.out_channels != channels:
        raise UnsupportedCNNError(
            f"{producer_name!r} (groups={producer.groups}, out_channels={producer.out_channels}) does not feed "
            f"{bn_name!r} ({channels} channels) one-to-one; grouped convolutions are not supported"
        )
    for name, module in leaves[index + 1:]:
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.in_channels != channels:
                raise UnsupportedCNNError(
                    f"consumer {name!r} (groups={module.groups}, in_channels={module.in_channels}) does not read the "
                    f"{channels} channels of {bn_name!r} one-to-one"
                )
            return producer_name, name
        if isinstance(module, nn.Linear):
            if module.in_features % channels:
                raise UnsupportedCNNError(
                    f"classifier {name!r} has {module.in_features} input features, not a multiple of the "
                    f"{channels} channels of {bn_name!r}"
                )
            return producer_name, name
        if isinstance(module, (*_POOLS, *_NEUTRAL)):
            continue
        if activation_kind(module) is not None or isinstance(module, (nn.Sigmoid,)):
            if not _maps_zero_to_zero(module, channels):
                raise UnsupportedCNNError(
                    f"{name!r} ({type(module).__name__}) does not map 0 to 0, so a pruned channel would not be silent"
                )
            continue
        raise UnsupportedCNNError(
            f"{name!r} ({type(module).__name__}) between {bn_name!r} and the next conv/linear layer is not "
            f"channel-wise; slim_cnn_channels cannot follow the channels through it"
        )
    raise UnsupportedCNNError(f"no Conv2d or Linear layer reads the output of {bn_name!r}")


def _select(parameter: nn.Parameter | None, index: Tensor, dim: int) -> nn.Parameter | None:
    if parameter is None:
        return None
    return nn.Parameter(parameter.detach().index_select(dim, index.to(parameter.device)).clone(),
                        requires_grad=parameter.requires_grad)


@torch.no_grad()
def slim_cnn_channels(model: nn.Module, keep: Mapping[str, Tensor]) -> nn.Module:
    """A physically smaller copy of ``model`` without the pruned channels (``model`` is not modified).

    ``keep``: {BN name: keep mask [C] bool}, e.g. from ``select_bn_channels`` or ``NetworkSlimmingPruning.keep``.
    Equal outputs to ``mask_bn_channels`` of the same masks in eval mode. Raises UnsupportedCNNError for
    structures it cannot follow (see the module docstring), ValueError for bad masks.
    """
    slimmed = copy.deepcopy(model)
    plans = []
    for bn_name, mask in keep.items():
        bn = slimmed.get_submodule(bn_name)
        if not isinstance(bn, nn.BatchNorm2d):
            raise UnsupportedCNNError(
                f"{bn_name!r} is a {type(bn).__name__}; slim_cnn_channels removes BatchNorm2d channels"
            )
        mask = _check_keep(bn_name, mask, bn.num_features)
        plans.append((bn_name, mask, *_slimming_plan(slimmed, bn_name, bn.num_features)))
    for bn_name, mask, producer_name, consumer_name in plans:
        if bool(mask.all()):
            continue
        index = mask.nonzero().flatten()
        channels = mask.numel()
        producer = slimmed.get_submodule(producer_name)
        producer.weight = _select(producer.weight, index, 0)
        producer.bias = _select(producer.bias, index, 0)
        producer.out_channels = len(index)
        bn = slimmed.get_submodule(bn_name)
        bn.weight = _select(bn.weight, index, 0)
        bn.bias = _select(bn.bias, index, 0)
        if bn.running_mean is not None:
            bn.running_mean = bn.running_mean.index_select(0, index.to(bn.running_mean.device)).clone()
            bn.running_var = bn.running_var.index_select(0, index.to(bn.running_var.device)).clone()
        bn.num_features = len(index)
        consumer = slimmed.get_submodule(consumer_name)
        if isinstance(consumer, nn.Conv2d):
            consumer.weight = _select(consumer.weight, index, 1)
            consumer.in_channels = len(index)
        else:
            positions = consumer.in_features // channels  # flattened channel-major: channel c owns a block
            columns = (index[:, None] * positions + torch.arange(positions)).flatten()
            consumer.weight = _select(consumer.weight, columns, 1)
            consumer.in_features = len(columns)
    return slimmed


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@torch.no_grad()
def slim_mlp_neurons(model: nn.Sequential, keep: Mapping[str, Tensor]) -> nn.Sequential:
    """A physically smaller copy of ``model`` (an ``nn.Sequential`` MLP such as ``DigitsMLP``) without the pruned
    hidden neurons.

    ``keep``: {Linear name: keep mask [out_features] bool} for hidden layers. A pruned neuron loses its weight row
    and bias entry, and its column in the next Linear. With the pruned rows and biases zeroed (what
    ``network_trimming`` does), the outputs equal the masked model's: ReLU(0) = 0 contributes nothing.
    """
    linears = [name for name, module in model.named_children() if isinstance(module, nn.Linear)]
    slimmed = copy.deepcopy(model)
    for name, mask in keep.items():
        if name not in linears[:-1]:
            raise ValueError(f"{name!r} is not a hidden Linear layer of the MLP; hidden layers: {linears[:-1]}")
        index = torch.as_tensor(mask).bool().flatten().nonzero().flatten()
        layer, following = slimmed.get_submodule(name), slimmed.get_submodule(linears[linears.index(name) + 1])
        if len(torch.as_tensor(mask).flatten()) != layer.out_features:
            raise ValueError(f"keep mask for {name!r} has {len(mask)} entries, the layer has {layer.out_features}")
        if len(index) == 0:
            raise ValueError(f"keep mask for {name!r} removes every neuron; keep at least one")
        layer.weight = nn.Parameter(layer.weight[index].clone())
        layer.bias = nn.Parameter(layer.bias[index].clone())
        layer.out_features = len(index)
        following.weight = nn.Parameter(following.weight[:, index].clone())
        following.in_features = len(index)
    return slimmed
