"""The small networks the classic pruning methods are shown on, for 8x8 digits ([batch, 1, 8, 8] images).

- ``DigitsCNN``: ``features`` = three Conv3x3-BatchNorm-ReLU blocks (widths ``w1, w2, w3``; 8x8, 8x8 after the
  first two, a 2x2 max-pool, then 4x4 for the third), then global average pooling and a Linear ``classifier``.
  This is the shape ``slim_cnn_channels`` follows (VGG-BN-like, no residuals), so network slimming can remove
  channels physically.
- ``DigitsMLP``: flatten, ``Linear(64, h1)``-ReLU-``Linear(h1, h2)``-ReLU-``Linear(h2, 10)``; with (300, 100) it
  is the LeNet-300-100 of the lottery-ticket paper, with 64 inputs instead of 784.

Both are built under a seed with torch's default initialisation. Their physical slimming is
``inc_plugins.models.surgery_cnn`` (``slim_cnn_channels``, ``slim_mlp_neurons``); ``macs_per_image`` counts the
multiply-accumulates of the Conv and Linear layers; ``save_digits_model`` / ``load_digits_model`` keep the
(possibly slimmed) sizes next to the weights.

They live with the recipes, not in ``inc_plugins.models``: they are the digits task's example networks, shaped by
its data (``digits.IMAGE_SHAPE``, ``NUM_CLASSES``), and no library code needs them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .digits import IMAGE_SHAPE, NUM_CLASSES

ARCHITECTURES = ("digits_cnn", "digits_mlp")


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class DigitsCNN(nn.Module):
    def __init__(self, widths: Sequence[int] = (32, 64, 128), num_classes: int = NUM_CLASSES):
        super().__init__()
        w1, w2, w3 = _check_widths(widths, 3, "digits_cnn")
        self.features = nn.Sequential(
            _conv_block(IMAGE_SHAPE[0], w1), _conv_block(w1, w2), nn.MaxPool2d(2), _conv_block(w2, w3)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(w3, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(images)).flatten(1))

    def widths(self) -> list[int]:
        return [block[0].out_channels for block in self.features if isinstance(block, nn.Sequential)]


class DigitsMLP(nn.Sequential):
    def __init__(self, widths: Sequence[int] = (300, 100), num_classes: int = NUM_CLASSES):
        h1, h2 = _check_widths(widths, 2, "digits_mlp")
        inputs = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
        super().__init__(
            nn.Flatten(), nn.Linear(inputs, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, num_classes)
        )

    def widths(self) -> list[int]:
        return [layer.out_features for layer in self if isinstance(layer, nn.Linear)][:-1]


def _check_widths(widths: Sequence[int], count: int, architecture: str) -> list[int]:
    widths = list(widths)
    if len(widths) != count or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"{architecture} takes {count} layer widths (integers >= 1), got {widths!r}")
    return widths


def build_digits_model(architecture: str, widths: Sequence[int] | None = None, seed: int = 0) -> nn.Module:
    """A freshly initialised ``digits_cnn`` or ``digits_mlp`` (default widths when ``widths`` is None), in train
    mode; the caller's RNG state is left untouched."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown digits architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    cls = DigitsCNN if architecture == "digits_cnn" else DigitsMLP
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls() if widths is None else cls(widths)


def architecture_of(model: nn.Module) -> str:
    if isinstance(model, DigitsCNN):
        return "digits_cnn"
    if isinstance(model, DigitsMLP):
        return "digits_mlp"
    raise TypeError(f"{type(model).__name__} is not one of the digits models ({', '.join(ARCHITECTURES)})")


@torch.no_grad()
def macs_per_image(model: nn.Module) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers for one 8x8 image (dense count: zeros count too)."""
    total = 0

    def count(module: nn.Module, args, output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output[0].numel() * kernel
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *IMAGE_SHAPE))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def save_digits_model(model: nn.Module, directory: Path) -> None:
    """``model.safetensors`` and ``architecture.json`` (architecture and per-layer widths) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "architecture.json").write_text(
        json.dumps({"architecture": architecture_of(model), "widths": model.widths()}, indent=2) + "\n"
    )


def load_digits_model(directory: str | Path) -> nn.Module:
    """The model ``save_digits_model`` wrote (slimmed sizes included), in eval mode."""
    directory = Path(directory)
    spec = json.loads((directory / "architecture.json").read_text())
    model = build_digits_model(spec["architecture"], spec["widths"])
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval()
