"""Ends INC's training-aware pruning cleanly.

`prepare_pruning(..., optimizer=...)` leaves a forward pre-hook on the model that advances the pruning schedule on
*every* forward pass (evaluation included), rewrites `optimizer.step`, and replaces `torch.save` process-wide.
INC 3.7.1 has no public way to undo this.
"""

import torch


def complete_pruning(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> torch.nn.Module:
    """Detach INC's hooks after `on_train_end()`; the pruned weights stay as they are."""
    handle = model.__dict__.pop("inc_hook_handle", None)
    if handle is not None:
        handle.remove()
    model.__dict__.pop("prunings", None)
    if optimizer is not None and "orig_step" in optimizer.__dict__:
        optimizer.step = optimizer.__dict__.pop("orig_step")
        optimizer.__dict__.pop("prunings", None)
    if hasattr(torch, "orig_save"):
        torch.save = torch.orig_save
    return model
