"""Views of Linear, transformers Conv1D and Conv2d layers as ``[out_features, in_features]`` matrices.

A pruning algorithm works on ``weight_matrix(module)`` and on ``input_rows(module, x)``; their product
``input_rows(module, x) @ weight_matrix(module).T`` is the layer's output without bias, one row per token
(or per output position of a convolution). ``apply_matrix_mask`` writes a matrix mask back into the layer's
own weight layout.
"""

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

_SUPPORTED = "torch.nn.Linear, transformers Conv1D (GPT-2 style, weight [in, out]) and torch.nn.Conv2d (groups=1)"


def _check_supported(module: torch.nn.Module) -> None:
    if not isinstance(module, (torch.nn.Linear, Conv1D, torch.nn.Conv2d)):
        raise TypeError(f"{type(module).__name__} has no matrix view; supported layers: {_SUPPORTED}")
    if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
        raise ValueError(
            f"Conv2d with groups={module.groups} has no single [out, in] matrix view; only groups=1 is supported"
        )


def weight_matrix(module: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out_features, in_features]`` (detached; a view of the weight, do not write to it).

    Linear: ``weight``; Conv1D: ``weight.T``; Conv2d: ``weight.reshape(out_channels, in_channels * kh * kw)``
    (channel-major, the order ``torch.nn.functional.unfold`` uses).
    """
    _check_supported(module)
    weight = module.weight.detach()
    if isinstance(module, Conv1D):
        return weight.T
    if isinstance(module, torch.nn.Conv2d):
        return weight.reshape(weight.shape[0], -1)
    return weight


def _padded(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as the convolution pads it (any padding mode, ``"same"`` included)."""
    if conv.padding == "valid":
        return x
    # F.pad lists the last dimension first: (left, right, top, bottom).
    pads: list[int] = []
    for dim in reversed(range(2)):
        if conv.padding == "same":
            # Same split as torch: odd totals put the extra element after the input.
            total = conv.dilation[dim] * (conv.kernel_size[dim] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [conv.padding[dim], conv.padding[dim]]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pads, mode=mode)


def input_rows(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward input ``x`` as rows ``[tokens, in_features]`` matching ``weight_matrix``'s columns.

    Linear / Conv1D: every leading dimension is flattened into tokens. Conv2d: ``x`` is ``[batch, C, H, W]``
    (or unbatched ``[C, H, W]``); each output position of each image becomes one row of its receptive field,
    so ``tokens = batch * H_out * W_out`` and ``in_features = C * kh * kw``.
    """
    _check_supported(module)
    in_features = weight_matrix(module).shape[1]
    if not isinstance(module, torch.nn.Conv2d):
        return x.reshape(-1, in_features)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    columns = F.unfold(_padded(module, x), module.kernel_size, dilation=module.dilation, stride=module.stride)
    return columns.transpose(1, 2).reshape(-1, in_features)


def input_samples(module: torch.nn.Module, x: torch.Tensor) -> int:
    """How many samples (sequences or images) the layer's forward input ``x`` holds: its batch size.

    Linear / Conv1D inputs ``[batch, ..., in_features]`` hold ``batch``, a 2-D ``[tokens, in_features]`` input
    one (as the Wanda reference counts it); Conv2d ``[batch, C, H, W]`` holds ``batch``, ``[C, H, W]`` one.
    """
    _check_supported(module)
    unbatched_dims = 3 if isinstance(module, torch.nn.Conv2d) else 2
    return x.shape[0] if x.dim() > unbatched_dims else 1


def apply_matrix_mask(module: torch.nn.Module, mask: torch.Tensor) -> None:
    """Zero, in place and in the layer's own layout, the weights where ``mask`` (bool ``[out, in]``) is False."""
    expected = weight_matrix(module).shape
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = keep), got dtype {mask.dtype}")
    if mask.shape != expected:
        raise ValueError(
            f"mask shape {list(mask.shape)} does not match the {type(module).__name__}'s "
            f"[out_features, in_features] = {list(expected)}"
        )
    weight = module.weight
    if isinstance(module, Conv1D):
        mask = mask.T
    mask = mask.reshape(weight.shape).to(weight.device)
    with torch.no_grad():
        weight.masked_fill_(~mask, 0)
