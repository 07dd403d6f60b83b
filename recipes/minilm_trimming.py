"""Network trimming on a transformer: APoZ of MiniLM's GELU FFN neurons, with a threshold.

An extension of Hu et al. 2016, whose APoZ counts exact zeros after ReLU: GELU outputs are (almost) never exactly
zero, so an output counts as zero when ``|GELU(x)| <= threshold``. INC's ``network_trimming`` (``op_names:
["intermediate.dense"]``, ``apoz_threshold``) measures APoZ over the real (non-padding) tokens of calibration
sentences and zeroes the rows and biases of the neurons with the highest APoZ in every layer; GELU(0) = 0, so a
pruned neuron is silent. Fine-tuning then runs with the pruned neurons held at zero (re-zeroed after every step).
The control prunes the same number of random neurons per layer.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

import inc_plugins

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


def random_keep(keep: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Masks with as many pruned neurons per layer as ``keep``, at random positions."""
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for name, mask in keep.items():
        new = torch.ones_like(mask, dtype=torch.bool)
        new[torch.randperm(len(mask), generator=generator)[:int((~mask.bool()).sum())]] = False
        result[name] = new
    return result


def trim_ffn(model: nn.Module, fraction: float, threshold: float, calibration: list[dict]):
    """INC ``network_trimming`` of every FFN's neurons in place; (keep masks, APoZ) per layer."""
    config = inc_plugins.pruning_config(pruning_configs=[{
        "pruning_type": "network_trimming", "target_sparsity": fraction, "pattern": "1xchannel",
        "op_names": [FFN_LAYERS], "apoz_threshold": threshold, "pruning_scope": "local"}])
    pruning = inc_plugins.prepare_pruning(model, config, dataloader=calibration)
    return dict(pruning.keep), dict(pruning.apoz)


def trimming_on_minilm(fractions: Sequence[float], finetune_steps: int, calibration_samples: int, dev_size: int,
                       threshold: float, quick: bool = False, seed: int = 0, batch_size: int = 32,
                       learning_rate: float = 5e-5) -> dict:
    """Dev accuracy of MiniLM after APoZ trimming (and the random control) of each fraction of FFN neurons,
    before and after ``finetune_steps`` of fine-tuning (0: no fine-tuning). Uses the cached fine-tuned model of
    ``minilm_sentiment.yaml`` (``make demo`` fills the cache); ``quick`` refuses to fine-tune it first."""
    from . import apply, finetune_cache
    from .schema import RecipeError, load_recipe
    from .text_classification import evaluate, tokenized_batches, train

    recipe = load_recipe("minilm_sentiment.yaml")
    key = finetune_cache.finetune_key(recipe.model, recipe.data, recipe.finetune)
    if quick and not (finetune_cache.cached_dir(key) / "finetune.json").is_file():
        raise RecipeError(f"no cached fine-tuned MiniLM in {finetune_cache.cached_dir(key)}: run `make demo` first")
    model, tokenizer, train_examples, dev_examples, _ = apply.prepare_task(recipe)
    max_length = recipe.data.max_length
    dev = tokenized_batches(tokenizer, dev_examples[:dev_size], 128, max_length)
    calibration = tokenized_batches(tokenizer, random.Random(seed).sample(train_examples, calibration_samples),
                                    batch_size, max_length)
    finetune_batches = (tokenized_batches(tokenizer, train_examples, batch_size, max_length, shuffle_seed=seed + 1)
                        if finetune_steps > 0 else [])
    dense_accuracy = evaluate(model, dev, desc="dense")["accuracy"]

    rows, apoz_quantiles = [], None
    for fraction in fractions:
        row = {"fraction": fraction}
        pruned_model = copy.deepcopy(model)
        keep, apoz = trim_ffn(pruned_model, fraction, threshold, calibration)
        if apoz_quantiles is None:
            values = torch.cat(list(apoz.values())).float()
            apoz_quantiles = [round(float(q), 3) for q in torch.quantile(values, torch.tensor([0.1, 0.5, 0.9]))]
        control_model = copy.deepcopy(model)
        control_keep = random_keep(keep, seed + 2)
        zero_neurons(control_model, control_keep)
        for name, candidate, masks in (("apoz", pruned_model, keep), ("random", control_model, control_keep)):
            accuracy_pruned = evaluate(candidate, dev, desc=f"{name} {fraction} pruned")["accuracy"]
            accuracy_finetuned = None  # finetune_steps 0: pruning alone
            if finetune_steps > 0:
                torch.manual_seed(seed)
                train(candidate, finetune_batches, finetune_steps, learning_rate, desc=f"fine-tune {name} {fraction}",
                      after_step=lambda _, m=candidate, k=masks: zero_neurons(m, k))
                accuracy_finetuned = evaluate(candidate, dev, desc=f"{name} {fraction}")["accuracy"]
            row[name] = {"accuracy_pruned": accuracy_pruned, "accuracy_finetuned": accuracy_finetuned,
                         "neurons_pruned": sum(int((~mask).sum()) for mask in masks.values())}
            print(f"{name} {fraction}: {accuracy_pruned:.4f} -> {accuracy_finetuned}", flush=True)
        rows.append(row)
    return {"settings": {"threshold": threshold, "calibration_samples": calibration_samples,
                         "finetune_steps": finetune_steps, "batch_size": batch_size, "learning_rate": learning_rate,
                         "seed": seed, "scope": "local (each layer loses the same fraction)"},
            "dev_examples": min(dev_size, len(dev_examples)), "dense_accuracy": dense_accuracy,
            "apoz_quantiles": apoz_quantiles, "rows": rows}
