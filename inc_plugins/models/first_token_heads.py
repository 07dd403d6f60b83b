"""Sequence classifiers that read one token: their last block's FFN need run only there.

The head of a bert-like sequence classifier (BERT's pooler and classifier; the classification heads of RoBERTa,
XLM-RoBERTa, DistilBERT and MPNet) reads the last block's output at the first token only, and an FFN works position
by position, so at every other position the last FFN's work is thrown away: about a ninth of a 6-block MiniLM's
forward and backward passes. ``first_token_last_ffn`` runs that FFN on the first position alone. A pre-hook hands
the FFN's input layers the first position; the block then adds the FFN's output to its residual, which broadcasts
it over the positions, so the first position is exact and the others hold values nothing reads. Logits and losses
are the full model's, up to rounding. For passes that read only the logits or the loss (the mask search's Fisher
pass and step checks), never for passes that read hidden states at every position.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .architectures import ADAPTERS

__all__ = ["first_token_last_ffn", "reads_first_token_only"]


def reads_first_token_only(model: nn.Module) -> bool:
    """``model`` is a bert-like sequence classifier: its head reads the last block's first position only."""
    adapter = ADAPTERS.get(getattr(getattr(model, "config", None), "model_type", None))
    return (adapter is not None and adapter.family == "bert-like"
            and type(model).__name__.endswith("ForSequenceClassification"))


def _first_position(_module: nn.Module, args: tuple) -> tuple:
    return (args[0][:, :1], *args[1:])


@contextmanager
def first_token_last_ffn(model: nn.Module) -> Iterator[bool]:
    """Inside, the last block's FFN of a model that ``reads_first_token_only`` runs on the first position only;
    other models run as they are. Yields whether the shortcut is on."""
    if not reads_first_token_only(model):
        yield False
        return
    adapter = ADAPTERS[model.config.model_type]
    _, blocks = adapter.blocks(model)
    handles = [blocks[-1].get_submodule(name).register_forward_pre_hook(_first_position)
               for name in adapter.layout.ffn_in]
    try:
        yield True
    finally:
        for handle in handles:
            handle.remove()
