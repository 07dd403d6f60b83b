"""Network trimming on a transformer: APoZ of MiniLM's GELU FFN neurons, with a threshold, in Hu et al.'s
prune / fine-tune iterations.

An extension of Hu et al. 2016, whose APoZ counts exact zeros after ReLU: GELU outputs are (almost) never exactly
zero, so an output counts as zero when ``|GELU(x)| <= threshold``. INC's ``network_trimming`` (``op_names:
["intermediate.dense"]``, ``apoz_threshold``) measures APoZ over the real (non-padding) tokens of calibration
sentences and zeroes the rows and biases of the neurons with the highest APoZ in every layer; GELU(0) = 0, so a
pruned neuron is silent (APoZ 1), and the next iteration, asked for a larger fraction, keeps it pruned. Each
iteration fine-tunes with the pruned weights held at zero (``pruning_stage.finetune_holding_zeros``, what a recipe
stage's ``finetune_steps`` runs), starting from the surviving weights, as the paper does. The control prunes the same
number of random neurons per layer in every iteration, on a chain of its own.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

import inc_plugins

from . import apply, finetune_cache
from .pruning_stage import finetune_holding_zeros
from .schema import RecipeError, load_recipe
from .text_classification import evaluate, tokenized_batches

FFN_LAYERS = r"intermediate\.dense$"


@torch.no_grad()
def zero_neurons(model: nn.Module, keep: Mapping[str, Tensor]) -> None:
    """Zero the weight rows and bias entries of the pruned neurons ({Linear name: keep mask [out]})."""
    for name, mask in keep.items():
        layer = model.get_submodule(name)
        pruned = ~mask.to(layer.weight.device).bool()
        layer.weight[pruned] = 0.0
        if layer.bias is not None:
            layer.bias[pruned] = 0.0


def random_keep(keep: Mapping[str, Tensor], pruned_counts: Mapping[str, int], seed: int) -> dict[str, Tensor]:
    """Masks that keep ``keep``'s pruned neurons pruned and prune more at random, up to ``pruned_counts`` per layer."""
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for name, mask in keep.items():
        new = mask.clone().bool()
        kept = new.nonzero().flatten()
        more = pruned_counts[name] - int((~new).sum())
        new[kept[torch.randperm(len(kept), generator=generator)[:more]]] = False
        result[name] = new
    return result


def trim_ffn(model: nn.Module, fraction: float, threshold: float, calibration: list[dict]):
    """INC ``network_trimming`` of every FFN's neurons in place; (keep masks, APoZ) per layer."""
    config = inc_plugins.pruning_config(pruning_configs=[{
        "pruning_type": "network_trimming", "target_sparsity": fraction, "pattern": "1xchannel",
        "op_names": [FFN_LAYERS], "apoz_threshold": threshold, "pruning_scope": "local"}])
    pruning = inc_plugins.prepare_pruning(model, config, dataloader=calibration)
    return dict(pruning.result.keep), dict(pruning.result.apoz)


def trimming_on_minilm(fractions: Sequence[float], finetune_steps: int, calibration_samples: int, dev_size: int,
                       threshold: float, quick: bool = False, seed: int = 0, batch_size: int = 32,
                       learning_rate: float = 5e-5) -> dict:
    """Dev accuracy of MiniLM along Hu et al.'s iterations: iteration i trims the previous iteration's fine-tuned
    model to ``fractions[i]`` of the FFN neurons of every layer (cumulative, increasing) and fine-tunes it for
    ``finetune_steps`` (0: none). The random control runs the same iterations on a chain of its own. Uses the cached
    fine-tuned model of ``minilm_sentiment.yaml`` (``make demo`` fills the cache); ``quick`` refuses to fine-tune it
    first."""
    if list(fractions) != sorted(set(fractions)):
        raise ValueError(f"fractions are the cumulative targets of successive iterations: increasing, got {fractions}")
    recipe = load_recipe("minilm_sentiment.yaml")
    key = finetune_cache.finetune_key(recipe.model, recipe.data, recipe.finetune)
    if quick and not (finetune_cache.cached_dir(key) / "finetune.json").is_file():
        raise RecipeError(f"no cached fine-tuned MiniLM in {finetune_cache.cached_dir(key)}: run `make demo` first")
    model, tokenizer, train_examples, dev_examples, _ = apply.prepare_task(recipe)
    max_length = recipe.data.max_length
    dev = tokenized_batches(tokenizer, dev_examples[:dev_size], 128, max_length)
    calibration = tokenized_batches(tokenizer, random.Random(seed).sample(train_examples, calibration_samples),
                                    batch_size, max_length)
    finetune_batches = tokenized_batches(tokenizer, train_examples, batch_size, max_length, shuffle_seed=seed + 1)
    dense_accuracy = evaluate(model, dev, desc="dense")["accuracy"]

    chains = {"apoz": copy.deepcopy(model), "random": copy.deepcopy(model)}
    keep = None
    rows, apoz_quantiles = [], None
    for iteration, fraction in enumerate(fractions):
        row = {"iteration": iteration + 1, "fraction": fraction}
        previous_keep = keep
        keep, apoz = trim_ffn(chains["apoz"], fraction, threshold, calibration)
        if previous_keep is not None and any((keep[n].bool() & ~previous_keep[n].bool()).any() for n in keep):
            raise RuntimeError("an iteration revived a neuron the previous one pruned (its APoZ should be 1)")
        if apoz_quantiles is None:  # of the fine-tuned dense model
            values = torch.cat(list(apoz.values())).float()
            apoz_quantiles = [round(float(q), 3) for q in torch.quantile(values, torch.tensor([0.1, 0.5, 0.9]))]
        counts = {name: int((~mask.bool()).sum()) for name, mask in keep.items()}
        if iteration == 0:
            random_masks = {name: torch.ones_like(mask, dtype=torch.bool) for name, mask in keep.items()}
        random_masks = random_keep(random_masks, counts, seed + 2 + iteration)
        zero_neurons(chains["random"], random_masks)
        for name, masks in (("apoz", keep), ("random", random_masks)):
            candidate = chains[name]
            accuracy_pruned = evaluate(candidate, dev, desc=f"{name} {fraction} pruned")["accuracy"]
            accuracy_finetuned = None  # finetune_steps 0: pruning alone
            if finetune_steps > 0:
                offset = iteration * finetune_steps % len(finetune_batches)  # each iteration sees the next batches
                finetune_holding_zeros(candidate, finetune_batches[offset:] + finetune_batches[:offset],
                                       finetune_steps, learning_rate, seed, desc=f"fine-tune {name} {fraction}")
                accuracy_finetuned = evaluate(candidate, dev, desc=f"{name} {fraction}")["accuracy"]
            row[name] = {"accuracy_pruned": accuracy_pruned, "accuracy_finetuned": accuracy_finetuned,
                         "neurons_pruned": sum(int((~mask.bool()).sum()) for mask in masks.values())}
            print(f"iteration {iteration + 1}, {name} {fraction}: {accuracy_pruned:.4f} -> {accuracy_finetuned}",
                  flush=True)
        rows.append(row)
    return {"settings": {"threshold": threshold, "calibration_samples": calibration_samples,
                         "finetune_steps": finetune_steps, "batch_size": batch_size, "learning_rate": learning_rate,
                         "seed": seed, "scope": "local (each layer loses the same fraction)",
                         "iterations": "cumulative fractions; each iteration starts from the previous fine-tuned model"},
            "dev_examples": min(dev_size, len(dev_examples)), "dense_accuracy": dense_accuracy,
            "apoz_quantiles": apoz_quantiles, "rows": rows}
