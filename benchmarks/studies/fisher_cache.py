"""Mask gradients (Kwon et al.'s Fisher pass) kept in a file, so that a study can be rerun without repeating the
pass (16 minutes for SmolLM2-135M on 256 windows on 2 cores).

The file holds the gradients and what they were computed from (``identity``: model, calibration text, windows,
their length, batch and seed); a file whose identity differs from the one asked for is refused, never reused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file

from inc_plugins.post_training import MaskGradients

__all__ = ["cached_mask_gradients"]


def cached_mask_gradients(path: Path | None, identity: dict, compute: Callable[[], MaskGradients]) -> MaskGradients:
    """The gradients in ``path`` when it exists and was written for ``identity`` (ValueError when it was written
    for another), else ``compute()``, saved to ``path`` (when given) for the next run."""
    if path is not None and path.is_file():
        stored = load_file(path)
        with open(path, "rb") as handle:  # the metadata is in the safetensors header
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        written_for = json.loads(header.get("__metadata__", {}).get("identity", "null"))
        if written_for != identity:
            raise ValueError(f"{path} holds mask gradients of {written_for}, not of {identity}: delete it or pass "
                             f"another --fisher-cache")
        return MaskGradients(stored["head"], stored["neuron"], identity["per_sample"])
    gradients = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"head": gradients.head.contiguous(), "neuron": gradients.neuron.contiguous()}, path,
                  metadata={"identity": json.dumps(identity)})
    return gradients
