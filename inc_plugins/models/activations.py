"""Which modules are activations, and whether their outputs are exactly zero on part of their domain.

Network trimming reads APoZ at a layer's activation, and CNN slimming needs every module between a BatchNorm and
its consumer to map 0 to 0; both ask ``activation_kind``.
"""

from __future__ import annotations

from torch import nn

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

