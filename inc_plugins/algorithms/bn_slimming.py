"""Network slimming (Liu, Li, Shen, Huang, Yan and Zhang 2017, arXiv:1708.06519): BatchNorm scales as channel gates.

The paper trains with an L1 penalty on the BatchNorm scaling factors ``gamma`` (sparsity training), ranks the
channels of *all* BN layers together by ``|gamma|``, prunes the smallest ones to a global percentile, removes
them physically and fine-tunes. Pieces here:

(a) ``bn_l1_penalty(model, lam) = lam * sum over BN layers of sum |gamma|``, to add to the training loss. Its
    (sub)gradient with respect to ``gamma`` is ``lam * sign(gamma)``, with ``sign(0) = 0`` (the subgradient that
    autograd and the paper's reference code use). ``add_bn_l1_subgradient_(model, lam)`` adds that term to the
    ``.grad`` of every ``gamma`` in place, between ``loss.backward()`` and ``optimizer.step()``, as the paper's
    reference code does; the two are interchangeable (the INC adapter uses the second from INC's
    ``on_before_optimizer_step`` hook).
(b) ``select_bn_channels(model, fraction)``: global selection of the ``int(fraction * total)`` channels with the
    smallest ``|gamma|`` across the BN layers, keeping at least one channel in every layer (the paper relies on a
    percentile and notes that a layer must not be emptied; here it is a hard constraint, and a fraction that
    cannot be met without emptying a layer is an error).
(c) ``slim_cnn_channels(model, keep)``: physical removal. For each pruned BN channel the producing convolution
    loses the output filter (and bias), the BN loses the channel (scale, shift, running statistics), and the
    consumer loses the matching input: the next convolution's input channel, or the classifier's input
    features after (global) pooling and flattening (``in_features = channels * positions``, channel-major).
    Supported structures: an ``nn.Sequential`` (nested Sequentials allowed) of conv-BN-activation blocks, and
    models with an ``nn.Sequential`` ``features``, pooling/flatten children and a ``classifier`` (Linear or
    Sequential), such as the project's tiny CNN or VGG-style networks, i.e. structures whose execution order is
    their registration order. Grouped convolutions and residual connections are not supported.
(d) ``mask_bn_channels(model, keep)``: the same pruning without changing shapes: zero the producing filters and
    the BN's ``gamma`` and ``beta``, so the channel outputs exactly zero. A slimmed model computes the same
    function as the masked one (in eval mode; activations between BN and consumer must map 0 to 0).

Departures from the paper: the selection is one-shot to a fraction of channels (the paper's iterative
multi-pass scheme is the recipe's job); channels are removed even where the BN's ``beta`` is non-zero (as in
the paper: the pruned channel's constant contribution is lost and fine-tuning recovers).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


class UnsupportedCNNError(ValueError):
    """A model whose structure ``slim_cnn_channels`` cannot follow."""


# --- channel selection (shared with APoZ) ------------------------------------------------------------------


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"fraction of channels to prune must be a number in [0, 1), got {fraction!r}")


def prune_lowest_channels(scores: Mapping[str, Tensor], fraction: float, scope: str = "global") -> dict[str, Tensor]:
    """{name: keep mask [C] bool}: prune the channels with the lowest scores.

    ``scope="local"``: ``int(fraction * C)`` per layer (never all of them, since fraction < 1).
    ``scope="global"``: ``int(fraction * total)`` across layers, ranked together, at least one channel kept per
    layer; raises ValueError when that count cannot be reached without emptying a layer.
    Ties are broken by layer order, then channel index (lower first), so results are deterministic.
    """
    _check_fraction(fraction)
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be 'local' (per layer) or 'global' (across layers), got {scope!r}")
    if not scores:
        raise ValueError("no channels to select from")
    keep = {name: torch.ones(values.numel(), dtype=torch.bool) for name, values in scores.items()}
    if scope == "local":
        for name, values in scores.items():
            count = int(fraction * values.numel())
            order = torch.sort(values.detach().flatten().double().cpu(), stable=True).indices
            keep[name][order[:count]] = False
        return keep

    names = list(scores)
    sizes = [scores[name].numel() for name in names]
    total = sum(sizes)
    count = int(fraction * total)
    prunable = total - len(names)
    if count > prunable:
        raise ValueError(
            f"pruning {count} of {total} channels (fraction {fraction}) would remove every channel of some layer: "
            f"at most {prunable} can be pruned while keeping one channel in each of the {len(names)} layers"
        )
    flat = torch.cat([scores[name].detach().flatten().double().cpu() for name in names])
    layer_of = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes))
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    pruned = [0] * len(names)
    done = 0
    for position in torch.sort(flat, stable=True).indices.tolist():
        if done == count:
            break
        layer = int(layer_of[position])
        if pruned[layer] == sizes[layer] - 1:
            continue  # the layer's last channel stays
        keep[names[layer]][position - int(offsets[layer])] = False
        pruned[layer] += 1
        done += 1
    return keep


# --- (a) the sparsity penalty ------------------------------------------------------------------------------


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """{name: BatchNorm layer with a learnable scale} of ``model``."""
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.weight is not None
    }


def _as_batchnorms(model_or_layers: nn.Module | Iterable[_BatchNorm]) -> list[_BatchNorm]:
    if isinstance(model_or_layers, nn.Module):
        return list(batchnorm_layers(model_or_layers).values())
    return list(model_or_layers)


def bn_l1_penalty(model_or_layers: nn.Module | Iterable[_BatchNorm], lam: float) -> Tensor:
    """``lam * sum |gamma|`` over the BN layers (of a model, or given): a scalar to add to the loss.

    Its gradient with respect to each ``gamma`` is ``lam * sign(gamma)`` (0 where gamma is exactly 0).
    """
    layers = _as_batchnorms(model_or_layers)
    if not layers:
        raise ValueError("no BatchNorm layer with a learnable scale: network slimming needs BatchNorm after each conv")
    return lam * sum(layer.weight.abs().sum() for layer in layers)


@torch.no_grad()
def add_bn_l1_subgradient_(model_or_layers: nn.Module | Iterable[_BatchNorm], lam: float) -> None:
    """Add ``lam * sign(gamma)`` to every BN scale's ``.grad`` (creating it if absent), in place.

    Call between ``loss.backward()`` and ``optimizer.step()``; equivalent to adding ``bn_l1_penalty`` to the loss.
    """
    layers = _as_batchnorms(model_or_layers)
    if not layers:
        raise ValueError("no BatchNorm layer with a learnable scale: network slimming needs BatchNorm after each conv")
    for layer in layers:
        term = lam * torch.sign(layer.weight)
        if layer.weight.grad is None:
            layer.weight.grad = term.clone()
        else:
            layer.weight.grad.add_(term)


def batchnorm_scales(model_or_layers: nn.Module | Mapping[str, _BatchNorm]) -> dict[str, Tensor]:
    """{name: |gamma| [C]} (detached copies)."""
    layers = batchnorm_layers(model_or_layers) if isinstance(model_or_layers, nn.Module) else dict(model_or_layers)
    return {name: layer.weight.detach().abs().clone() for name, layer in layers.items()}


# --- (b) global channel selection --------------------------------------------------------------------------


def select_bn_channels(
    model_or_layers: nn.Module | Mapping[str, _BatchNorm], fraction: float, scope: str = "global"
) -> dict[str, Tensor]:
    """{BN name: keep mask [C] bool}: prune the channels with the smallest ``|gamma|``, across all given BN
    layers (``scope="global"``, the paper's choice; at least one channel kept per layer) or per layer."""
    scales = batchnorm_scales(model_or_layers)
    if not scales:
        raise ValueError("no BatchNorm layer with a learnable scale: network slimming needs BatchNorm after each conv")
    return prune_lowest_channels(scales, fraction, scope)


# --- structure -----------------------------------------------------------------------------------------------

_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if next(module.children(), None) is None]


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """{producer name: BN name} for every Conv/Linear immediately followed, in registration order, by a BatchNorm
    of its output width (conv -> BN as in Sequential blocks, torchvision ResNets and VGG-BN)."""
    leaves = _leaves(model)
    pairs = {}
    for (name, module), (next_name, following) in zip(leaves, leaves[1:]):
        if (
            isinstance(module, _PRODUCERS)
            and isinstance(following, _BatchNorm)
            and following.num_features == _out_channels(module)
        ):
            pairs[name] = next_name
    return pairs


# --- (d) masking ---------------------------------------------------------------------------------------------


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


# --- (c) physical removal ------------------------------------------------------------------------------------

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
    return _leaves(model)


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
        from .apoz import activation_kind  # a cycle at import time otherwise: apoz imports this module

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
