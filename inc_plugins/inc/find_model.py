"""Finds the model around the layers INC hands a criterion or a regularizer.

INC builds criteria and regularizers from a config entry's layers alone and never gives them the model. The
plugins that need it (``apoz``: the activation after each layer; ``bn_l1``: the BatchNorm after each layer) adopt
it at its first forward pass: a process-wide module forward pre-hook (torch's
``register_module_forward_pre_hook``) sees every module call in the process until the model is found, then
removes itself.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["ModelFinder"]


class ModelFinder:
    """Calls ``on_found(model)`` once, at the first forward pass of a module that contains every one of
    ``targets`` (the outermost module of that forward), then removes its hook. ``on_found`` is held weakly when it
    is a bound method, so the finder never keeps its owner alive; ``remove()`` (or garbage collection) stops it."""

    def __init__(self, targets: Iterable[nn.Module], on_found: Callable[[nn.Module], None]):
        self._target_ids = {id(module) for module in targets}
        self._rejected: set[int] = set()
        self._callback = weakref.WeakMethod(on_found) if hasattr(on_found, "__self__") else (lambda: on_found)
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args) -> None:
        if self._handle is None or id(module) in self._rejected:
            return
        callback = self._callback()
        if callback is None:  # the owner is gone
            self.remove()
            return
        if self._target_ids <= {id(m) for m in module.modules()}:
            self.remove()
            callback(module)
        else:
            self._rejected.add(id(module))

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.remove()
