"""APoZ monitoring (network trimming, Hu et al. 2016): count, per output channel of chosen layers, how often the
activation that follows each layer outputs zero, from forward hooks on a model.

Where a layer's activations are read: the first activation *module* (``inc_plugins.models.activations``) that
runs after the layer with only channel-wise pass-through modules in between (BatchNorm of the right width,
Dropout, Identity, and the completion of container modules). For the CNN structure conv -> BatchNorm -> ReLU
this is the ReLU after the BN; for a BERT FFN (``intermediate.dense`` -> GELU -> ``output.dense``) it is the
GELU output. The counting and the APoZ math are ``inc_plugins.algorithms.apoz``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from inc_plugins.algorithms.apoz import APoZAccumulator
from inc_plugins.finite_checks import check_tensor
from inc_plugins.models.activations import activation_kind
from inc_plugins.models.cnn_structure import out_channels, output_channel_dim

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
    is matched to the most recent target. ``threshold``: see ``inc_plugins.algorithms.apoz``. An activation
    output that holds NaN or Inf raises NonFiniteError naming the layer, from inside the forward pass.
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
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.num_features == out_channels(layer):
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
