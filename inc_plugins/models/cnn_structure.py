"""What a plain torch CNN or MLP looks like to the channel pruners: its weighted layers (Linear, Conv1d/2d/3d), the
dimension that indexes their output channels, its BatchNorm layers, and which BatchNorm follows which layer.

Transformer families are described by ``architectures.py``; these helpers follow modules by type and registration
order only, so they apply to any ``nn.Module``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layers whose ``weight`` the unstructured and channel pruners of this project handle."""


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module without children, in registration order."""
    return [(name, module) for name, module in model.named_modules() if next(module.children(), None) is None]


def out_channels(module: nn.Module) -> int:
    """Output channels (Conv) or features (Linear) of ``module``."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def output_channel_dim(module: nn.Module) -> int:
    """Dimension of ``module``'s output that indexes its output channels / neurons."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return 1
    if isinstance(module, nn.Linear):
        return -1
    raise TypeError(f"APoZ scores output channels of Linear and Conv1d/2d/3d layers, got {type(module).__name__}")


def prunable_layers(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """{name: layer} whose ``weight`` IMP prunes: every Linear/ConvNd, or exactly ``names`` (must be such layers)."""
    if names is None:
        layers = {name: module for name, module in model.named_modules() if isinstance(module, PRUNABLE_TYPES)}
    else:
        layers = {}
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, PRUNABLE_TYPES):
                raise TypeError(f"{name!r} is a {type(module).__name__}; IMP prunes Linear and Conv layers")
            layers[name] = module
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer to prune")
    return layers


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """{name: BatchNorm layer with a learnable scale} of ``model``."""
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.weight is not None
    }


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """{producer name: BN name} for every Conv/Linear immediately followed, in registration order, by a BatchNorm
    of its output width (conv -> BN as in Sequential blocks, torchvision ResNets and VGG-BN)."""
    leaves = leaf_modules(model)
    pairs = {}
    for (name, module), (next_name, following) in zip(leaves, leaves[1:]):
        if (
            isinstance(module, PRUNABLE_TYPES)
            and isinstance(following, _BatchNorm)
            and following.num_features == out_channels(module)
        ):
            pairs[name] = next_name
    return pairs
