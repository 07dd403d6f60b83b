"""Network trimming (Hu, Peng, Tai and Tang 2016, arXiv:1607.03250): Average Percentage of Zeros (APoZ).

The paper scores each output channel (or neuron) ``c`` of a layer by the fraction of its post-ReLU outputs that
are zero over a validation set::

    APoZ_c = sum_k sum_j [O_c,j(k) == 0] / (N * M)

with ``N`` images ``k`` and ``M`` positions ``j`` of the channel's output map (``M = 1`` for a fully connected
neuron). A channel that is almost always zero carries little information and is pruned first.

What this module adds or changes, and why:

- **Threshold for smooth activations (an extension, not in the paper).** GELU, SiLU, ... are never exactly zero
  for finite inputs, so an output counts as "zero" when ``|x| <= threshold``. With ``threshold=None`` the
  threshold is 0 for activations that output exact zeros (ReLU, ReLU6, Hardswish) and a smooth activation is
  an error that asks for an explicit threshold; ``threshold=0.0`` with a smooth activation is allowed (it only
  counts underflowed outputs).
- **Where the activations are read.** For each layer to score (Linear or Conv1d/2d/3d), ``APoZMonitor`` watches
  the model's module calls and takes the first activation *module* that runs after the layer with only
  channel-wise pass-through modules in between (BatchNorm of the right width, Dropout, Identity, and the
  completion of container modules). For the CNN structure conv -> BatchNorm -> ReLU this is the ReLU after the
  BN; for a BERT FFN (``intermediate.dense`` -> GELU -> ``output.dense``) it is the GELU output, i.e. the input of
  the FFN output dense. A layer followed by anything else first (another weighted layer, LayerNorm, pooling, a
  functional ``F.relu`` that no hook can see) has no activation site and is reported as an error.
- **Padding tokens** can be left out: ``monitor.valid_positions = attention_mask`` ([batch, seq]) makes
  ``[batch, seq, channels]`` activations count only positions where the mask is non-zero.
- **Selection.** The paper iterates "prune the channels with high APoZ, then fine-tune" and picks its pruned
  neurons with per-layer rules; ``channels_to_prune`` prunes a target fraction in one go, per layer or across
  layers (keeping at least one channel per layer). Iterating with fine-tuning is the caller's (recipe's) job.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from inc_plugins.finite_checks import check_tensor

from .bn_slimming import prune_lowest_channels

# Activations whose outputs are exactly zero on part of their domain (APoZ as in the paper).
EXACT_ZERO_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Hardswish)
# Activations that are (almost) never exactly zero: APoZ needs a threshold |x| <= t.
SMOOTH_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.LeakyReLU, nn.PReLU, nn.RReLU,
    nn.Hardtanh, nn.Tanh,
)
_SMOOTH_NAME_PARTS = ("GELU", "SiLU", "Swish", "Mish")  # e.g. transformers' GELUActivation, NewGELUActivation
_NOT_EXACT_RELUS = (nn.LeakyReLU, nn.PReLU, nn.RReLU)


def activation_kind(module: nn.Module) -> str | None:
    """``"exact_zero"`` (ReLU-like), ``"smooth"`` (GELU-like) or None when ``module`` is not an activation.

    Besides torch's classes, a class whose name contains "ReLU" is exact-zero (e.g. a ReLU-squared module), and
    one whose name contains GELU/SiLU/Swish/Mish or ends in "Activation" is smooth (transformers' activations).
    """
    name = type(module).__name__
    if isinstance(module, _NOT_EXACT_RELUS):
        return "smooth"
    if isinstance(module, EXACT_ZERO_ACTIVATIONS) or "ReLU" in name:
        return "exact_zero"
    if isinstance(module, SMOOTH_ACTIVATIONS) or any(part in name for part in _SMOOTH_NAME_PARTS):
        return "smooth"
    if name.endswith("Activation") and not list(module.children()):
        return "smooth"
    return None


def _channels_last(activations: Tensor, channel_dim: int) -> Tensor:
    return activations.movedim(channel_dim, -1)


def zero_counts(
    activations: Tensor, channel_dim: int, threshold: float = 0.0, valid: Tensor | None = None
) -> tuple[Tensor, int]:
    """(zeros per channel [C] float64, positions counted per channel) of one activation tensor.

    An output is "zero" when ``|x| <= threshold``. ``valid`` ([batch, seq], non-zero = counted) applies to
    ``[batch, seq, C]`` activations with ``channel_dim`` -1 and drops e.g. padding tokens.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    values = _channels_last(activations.detach(), channel_dim)
    channels = values.shape[-1]
    is_zero = values.abs() <= threshold
    if valid is not None:
        if is_zero.dim() != 3 or tuple(valid.shape) != tuple(is_zero.shape[:2]):
            raise ValueError(
                f"valid positions of shape {list(valid.shape)} do not match activations {list(activations.shape)}"
                f" (expected [batch, seq] for [batch, seq, channels])"
            )
        keep = valid.to(is_zero.device).bool()
        is_zero = is_zero[keep]
    rows = is_zero.reshape(-1, channels)
    return rows.sum(dim=0, dtype=torch.float64), rows.shape[0]


def apoz(activations: Tensor, channel_dim: int, threshold: float = 0.0, valid: Tensor | None = None) -> Tensor:
    """APoZ of each channel of one activation tensor: [C] float64 in [0, 1]."""
    zeros, positions = zero_counts(activations, channel_dim, threshold, valid)
    if positions == 0:
        raise ValueError("no positions to count (every position is masked out)")
    return zeros / positions


@dataclass
class APoZAccumulator:
    """Running APoZ of one layer's channels over many batches."""

    zeros: Tensor | None = None
    positions: int = 0

    def update(self, activations: Tensor, channel_dim: int, threshold: float = 0.0, valid: Tensor | None = None):
        zeros, positions = zero_counts(activations, channel_dim, threshold, valid)
        self.zeros = zeros.cpu() if self.zeros is None else self.zeros + zeros.cpu()
        self.positions += positions

    @property
    def apoz(self) -> Tensor:
        if self.zeros is None or self.positions == 0:
            raise ValueError("no activations seen yet")
        return self.zeros / self.positions


def output_channel_dim(module: nn.Module) -> int:
    """Dimension of ``module``'s output that indexes its output channels / neurons."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return 1
    if isinstance(module, nn.Linear):
        return -1
    raise TypeError(f"APoZ scores output channels of Linear and Conv1d/2d/3d layers, got {type(module).__name__}")


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


_PASS_THROUGH = (nn.Identity, nn.modules.dropout._DropoutNd)


@dataclass
class ActivationSite:
    """Where a layer's APoZ is read: the activation module's name and the BatchNorm layers passed on the way."""

    activation: str
    kind: str
    batchnorms: list[str] = field(default_factory=list)


@dataclass
class _Pending:
    name: str
    shape: torch.Size
    batchnorms: list[str]


class APoZMonitor:
    """Accumulates the APoZ of ``targets`` ({name: Linear | ConvNd} in ``model``) at their activation sites.

    Use as a context manager (or ``attach()`` / ``detach()``) around forward passes of ``model``. Forward hooks
    on every module of ``model`` follow the call order: a target's output is "pending" until the first
    activation module runs (its APoZ is counted if its output has the target's output shape), and it is dropped
    when any module other than a pass-through (matching BatchNorm, Dropout, Identity, a container finishing)
    runs first. Shared activation modules (one ReLU instance called after several layers) work, since each call
    is matched to the most recent target. ``threshold``: see the module docstring. An activation output that holds
    NaN or Inf raises NonFiniteError naming the layer, from inside the forward pass.
    """

    def __init__(self, model: nn.Module, targets: Mapping[str, nn.Module], threshold: float | None = None):
        if threshold is not None and threshold < 0:
            raise ValueError(f"APoZ threshold must be >= 0, got {threshold}")
        self.model = model
        self.targets = dict(targets)
        for name, module in self.targets.items():
            output_channel_dim(module)  # raises for unsupported layer types, naming the type
        self.threshold = threshold
        self.valid_positions: Tensor | None = None
        self.sites: dict[str, ActivationSite] = {}
        self.accumulators = {name: APoZAccumulator() for name in self.targets}
        self._target_of = {id(module): name for name, module in self.targets.items()}
        self._names = {id(module): name for name, module in model.named_modules()}
        missing = [name for name, module in self.targets.items() if id(module) not in self._names]
        if missing:
            raise ValueError(f"layers {missing} are not submodules of {type(model).__name__}")
        self._state = threading.local()
        self._handles: list = []

    # --- hooks ---------------------------------------------------------------------------------------------

    def attach(self) -> "APoZMonitor":
        if not self._handles:
            self._handles = [module.register_forward_hook(self._on_forward) for module in self.model.modules()]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._state = threading.local()

    def __enter__(self) -> "APoZMonitor":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _threshold_for(self, kind: str, target: str, activation: nn.Module) -> float:
        if self.threshold is not None:
            return self.threshold
        if kind == "exact_zero":
            return 0.0
        raise ValueError(
            f"layer {target!r} is followed by {type(activation).__name__}, which is (almost) never exactly zero: "
            f"give an APoZ threshold (outputs with |x| <= threshold count as zero), e.g. 0.05"
        )

    def _on_forward(self, module: nn.Module, args, output) -> None:
        pending: _Pending | None = getattr(self._state, "pending", None)
        target = self._target_of.get(id(module))
        if target is not None:
            self._state.pending = _Pending(target, output.shape, []) if isinstance(output, Tensor) else None
            return
        if pending is None:
            return
        kind = activation_kind(module)
        if kind is not None:
            self._state.pending = None
            if isinstance(output, Tensor) and output.shape == pending.shape:
                self._record(pending, module, kind, output)
            return
        layer = self.targets[pending.name]
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.num_features == _out_channels(layer):
            pending.batchnorms.append(self._names[id(module)])
            return
        if isinstance(module, _PASS_THROUGH) or next(module.children(), None) is not None:
            return
        self._state.pending = None  # another layer consumed the output first: no activation site this time

    def _record(self, pending: _Pending, activation: nn.Module, kind: str, output: Tensor) -> None:
        # NaN is never counted as zero (|NaN| <= t is False): it would pass for an always-active channel
        check_tensor(output, pending.name, "output activation", f"APoZ read at {self._names[id(activation)]!r}")
        threshold = self._threshold_for(kind, pending.name, activation)
        layer = self.targets[pending.name]
        channel_dim = output_channel_dim(layer)
        valid = self.valid_positions
        token_shaped = output.dim() == 3 and channel_dim == -1
        if valid is not None and not (token_shaped and tuple(valid.shape) == tuple(output.shape[:2])):
            valid = None  # the mask describes token positions; convolution maps have none
        self.accumulators[pending.name].update(output, channel_dim, threshold, valid)
        if pending.name not in self.sites:
            self.sites[pending.name] = ActivationSite(self._names[id(activation)], kind, list(pending.batchnorms))

    # --- results -------------------------------------------------------------------------------------------

    def unseen(self) -> list[str]:
        """Targets for which no activation output has been counted yet."""
        return [name for name, acc in self.accumulators.items() if acc.positions == 0]

    def apoz(self) -> dict[str, Tensor]:
        """{name: APoZ [out_channels] float64}. Raises ValueError naming the targets without an activation site."""
        unseen = self.unseen()
        if unseen:
            raise ValueError(
                f"no activation output was seen for {unseen}: APoZ is read at the first activation module "
                f"(ReLU, GELU, ...) that runs after the layer with only BatchNorm/Dropout in between. Layers "
                f"followed by another layer, a normalisation across channels, or a functional activation "
                f"(F.relu) cannot be scored; exclude them (e.g. select only FFN 'intermediate.dense' layers)"
            )
        return {name: acc.apoz for name, acc in self.accumulators.items()}


def channels_to_prune(apoz_by_layer: Mapping[str, Tensor], fraction: float, scope: str = "local") -> dict[str, Tensor]:
    """{name: keep mask [C] bool (True = kept)}: the channels with the *highest* APoZ are pruned.

    ``scope="local"``: each layer loses ``int(fraction * C)`` channels. ``scope="global"``: ``int(fraction * total)``
    channels across all layers, ranked together, at least one kept per layer. Ties: the lower index goes first.
    """
    return prune_lowest_channels({name: -values.double() for name, values in apoz_by_layer.items()}, fraction, scope)
