"""Network trimming's iterations (Hu et al. 2016) with their random control, around the caller's steps.

The paper prunes the channels/neurons with the highest APoZ, fine-tunes from the surviving weights, and repeats.
``run_trimming_iterations`` runs two chains, each from its own copy of the dense model: the APoZ chain, and a random
chain that prunes, in every iteration, the same number of channels per layer at random (the baseline APoZ must
beat). Iteration ``i`` (from 1), with ``setting = iterations[i - 1]`` (e.g. a fraction):

1. APoZ chain: ``prune(model, setting, previous)`` prunes by APoZ and returns a ``Pruned`` (model, keep masks, APoZ);
2. ``counts``: how many channels those keep masks drop in each layer;
3. random chain: ``prune_randomly(model, counts, generator_for(i), previous)`` drops that many per layer at random;
4. each chain in turn (APoZ, then random): ``evaluate`` the pruned model, ``finetune(model, i, label)`` it (skipped
   when ``finetune`` is None), ``evaluate`` it again.

``previous`` is that chain's keep masks of the iteration before (None in the first). The rows are per iteration.

Cumulative or per iteration: the driver passes the steps' own meaning through. A step that removes channels
physically (``recipes.classic_stages.iterative_trimming``) gets a fraction of what remains, and its keep masks (so
``counts``) cover the current, already smaller layers: per iteration. A step that zeroes neurons in place (the MiniLM
FFN study) gets a cumulative fraction, and its keep masks cover the full layers, earlier prunes included: cumulative;
its random step keeps the earlier prunes and adds more (``random_keep``).

The same arguments give the same chains: the driver draws no randomness of its own, and the random chain's
generators come from ``generator_for`` (one shared generator, or a freshly seeded one per iteration).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Chain", "Pruned", "TrimmingIteration", "random_keep", "run_trimming_iterations"]

Keep = dict[str, Tensor]  # {layer: keep mask [channels] bool (True = kept)}


@dataclass(frozen=True)
class Pruned:
    """What a pruning step returns: the pruned model (the one it was given when it prunes in place, or a smaller
    one), its keep masks, and the APoZ they were chosen by (random steps: None)."""

    model: nn.Module
    keep: Keep
    apoz: dict[str, Tensor] | None = None


@dataclass(frozen=True)
class TrimmingIteration:
    """One chain's iteration: ``keep`` and ``apoz`` as its step returned them, dev/test accuracy before and after
    fine-tuning (None when there is none), and ``measures``: ``measure(model)`` after fine-tuning (empty without it)."""

    iteration: int
    setting: Any
    keep: Keep
    apoz: dict[str, Tensor] | None
    accuracy_pruned: float
    accuracy_finetuned: float | None
    measures: dict = field(default_factory=dict)

    @property
    def pruned(self) -> int:
        """Channels the keep masks drop, over every layer (cumulative or per iteration: see the module doc)."""
        return sum(int((~mask.bool()).sum()) for mask in self.keep.values())


@dataclass
class Chain:
    """A chain's model after its last iteration and its rows, one per iteration."""

    model: nn.Module
    rows: list[TrimmingIteration] = field(default_factory=list)


def pruned_counts(keep: Mapping[str, Tensor]) -> dict[str, int]:
    return {name: int((~mask.bool()).sum()) for name, mask in keep.items()}


def random_keep(keep: Mapping[str, Tensor], counts: Mapping[str, int], generator: torch.Generator) -> Keep:
    """Masks that keep ``keep``'s dropped channels dropped and drop more at random, up to ``counts`` per layer.
    Draws one ``randperm`` of each layer's kept channels from ``generator``, in ``keep``'s order (all-True masks:
    a fresh random choice of ``counts``)."""
    result = {}
    for name, mask in keep.items():
        new = mask.clone().bool()
        kept = new.nonzero().flatten()
        more = counts[name] - int((~new).sum())
        if more < 0:
            raise ValueError(f"{name}: {int((~new).sum())} channels dropped already, more than {counts[name]}")
        new[kept[torch.randperm(len(kept), generator=generator)[:more]]] = False
        result[name] = new
    return result


def run_trimming_iterations(
    model: nn.Module,
    iterations: Sequence[Any],
    prune: Callable[[nn.Module, Any, Keep | None], Pruned],
    prune_randomly: Callable[[nn.Module, dict[str, int], torch.Generator, Keep | None], Pruned],
    generator_for: Callable[[int], torch.Generator],
    evaluate: Callable[[nn.Module, str], float],
    finetune: Callable[[nn.Module, int, str], None] | None = None,
    measure: Callable[[nn.Module], dict] | None = None,
) -> dict[str, Chain]:
    """{"apoz": Chain, "random": Chain}: the iterations of the module doc, each chain from a deep copy of ``model``
    (which is left alone). Labels passed to ``evaluate`` and ``finetune``: ``f"{chain} {setting}"``, with
    ``" pruned"`` appended for the evaluation before fine-tuning."""
    chains = {"apoz": Chain(copy.deepcopy(model)), "random": Chain(copy.deepcopy(model))}
    for iteration, setting in enumerate(iterations, start=1):
        previous = {name: chain.rows[-1].keep if chain.rows else None for name, chain in chains.items()}
        by_apoz = prune(chains["apoz"].model, setting, previous["apoz"])
        counts = pruned_counts(by_apoz.keep)
        at_random = prune_randomly(chains["random"].model, counts, generator_for(iteration), previous["random"])
        if pruned_counts(at_random.keep) != counts:
            raise RuntimeError(f"iteration {iteration}: the random step dropped {pruned_counts(at_random.keep)} "
                               f"channels per layer, the APoZ step {counts}")
        for name, pruned in (("apoz", by_apoz), ("random", at_random)):
            label = f"{name} {setting}"
            accuracy_pruned = evaluate(pruned.model, f"{label} pruned")
            accuracy_finetuned = None
            if finetune is not None:
                finetune(pruned.model, iteration, label)
                accuracy_finetuned = evaluate(pruned.model, label)
            chains[name].model = pruned.model
            chains[name].rows.append(TrimmingIteration(
                iteration, setting, pruned.keep, pruned.apoz, accuracy_pruned, accuracy_finetuned,
                measure(pruned.model) if measure is not None else {}))
    return chains
