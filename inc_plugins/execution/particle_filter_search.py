"""Particle-filter structured pruning of a model's Conv2d layers, one layer at a time (Anwar, Hwang and Sung 2017).

Each layer's candidate patterns are searched by ``inc_plugins.algorithms.particle_filter.particle_filter_search``,
scored by the model's misclassification rate on labelled batches with that layer's candidate mask applied (the
earlier layers' chosen masks applied, the later layers dense). See the algorithm module for the method and its
simplifications.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from inc_plugins.algorithms.particle_filter import (
    ParticleFilterSettings,
    SearchResult,
    StructuredPattern,
    particle_filter_search,
)
from inc_plugins.finite_checks import check_batch, check_parameters

from .misclassification import misclassification_rate, split_labelled_batch


def particle_filter_prune(
    model: nn.Module,
    layers: Mapping[str, nn.Conv2d],
    batches: Iterable,
    target_sparsity: float,
    granularity: str,
    settings: ParticleFilterSettings = ParticleFilterSettings(),
    companions: Mapping[str, nn.Module] | None = None,
) -> dict[str, SearchResult]:
    """Prune ``layers`` ({name: Conv2d} of ``model``, searched in the given order) in place; {name: result}.

    ``batches``: labelled evaluation batches (materialised once). ``companions``: {conv name: the BatchNorm that
    follows it}, whose scale and shift are zeroed with pruned output channels. With ``"channel"`` the conv's bias
    is zeroed for pruned output channels too; kernel-level patterns leave biases and BatchNorm alone.
    Raises NonFiniteError, before pruning anything, when a parameter of ``model`` or a batch holds NaN or Inf, and
    when the logits of a candidate pattern do (an overflow inside the model).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("particle-filter pruning needs labelled evaluation batches, got none")
    for batch in batches[:1]:
        split_labelled_batch(batch)
    check_parameters(model, "particle filter")
    for index, batch in enumerate(batches):
        check_batch(batch, index, "particle filter")
    generator = torch.Generator().manual_seed(settings.seed)
    companions = dict(companions or {}) if granularity == "channel" else {}
    results = {}
    for name, conv in layers.items():
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise TypeError(f"{name!r}: particle-filter patterns are for Conv2d layers with groups=1")
        pattern = StructuredPattern(conv.weight.shape, granularity, target_sparsity, settings.stride)
        original = conv.weight.detach().clone()
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        companion = companions.get(name)
        bn_state = None
        if companion is not None:
            bn_state = (companion.weight.detach().clone(),
                        companion.bias.detach().clone() if companion.bias is not None else None)

        def set_mask(mask: Tensor) -> None:
            with torch.no_grad():
                conv.weight.copy_(original * mask.to(original.device, original.dtype))
                if granularity != "channel":
                    return
                channel_kept = mask.reshape(mask.shape[0], -1).any(dim=1).to(original.device, original.dtype)
                if bias is not None:
                    conv.bias.copy_(bias * channel_kept)
                if companion is not None:
                    companion.weight.copy_(bn_state[0] * channel_kept.to(bn_state[0].device))
                    if bn_state[1] is not None:
                        companion.bias.copy_(bn_state[1] * channel_kept.to(bn_state[1].device))

        def error_of_mask(mask: Tensor) -> float:
            set_mask(mask)
            return misclassification_rate(model, batches)

        result = particle_filter_search(error_of_mask, pattern, settings, generator)
        set_mask(result.mask)
        results[name] = result
    return results
