"""Causal-LM perplexity over fixed token windows."""

import math

import torch

from inc_plugins.progress import progress


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp of the mean next-token negative log-likelihood over every predicted token of `windows` [n, seq_len]."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in progress(range(0, len(windows), batch_size), desc="perplexity", unit="batch"):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)
