"""Network trimming on a transformer: APoZ of a BERT-like classifier's GELU FFN neurons (MiniLM in the study; the
synthetic tiny BERT with ``--quick``), with a threshold, in Hu et al.'s prune / fine-tune iterations.

An extension of Hu et al. 2016, whose APoZ counts exact zeros after ReLU: GELU outputs are (almost) never exactly
zero, so an output counts as zero when ``|GELU(x)| <= threshold``. INC's ``network_trimming`` (``op_names:
["intermediate.dense"]``, ``apoz_threshold``) measures APoZ over the real (non-padding) tokens of calibration
sentences and zeroes the rows and biases of the neurons with the highest APoZ in every layer; GELU(0) = 0, so a
pruned neuron is silent (APoZ 1), and the next iteration, asked for a larger (cumulative) fraction, keeps it pruned.
Each iteration fine-tunes with the pruned weights held at zero (``pruning_stage.finetune_holding_zeros``, what a
recipe stage's ``finetune_steps`` runs), starting from the surviving weights, as the paper does. The control prunes
the same number of random neurons per layer in every iteration, on a chain of its own. The iterations are
``inc_plugins.execution.trimming_iterations``'s.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

import inc_plugins
from inc_plugins.execution.trimming_iterations import Pruned, random_keep, run_trimming_iterations
from recipes.movie_snippets import Example
from recipes.pruning_stage import finetune_holding_zeros
from recipes.text_classification import evaluate, tokenized_batches

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


def trim_ffn(model: nn.Module, fraction: float, threshold: float, calibration: list[dict]):
    """INC ``network_trimming`` of every FFN's neurons in place; (keep masks, APoZ) per layer."""
    config = inc_plugins.pruning_config(pruning_configs=[{
        "pruning_type": "network_trimming", "target_sparsity": fraction, "pattern": "1xchannel",
        "op_names": [FFN_LAYERS], "apoz_threshold": threshold, "pruning_scope": "local"}])
    pruning = inc_plugins.prepare_pruning(model, config, dataloader=calibration)
    return dict(pruning.result.keep), dict(pruning.result.apoz)


def trimming_on_ffn(model: nn.Module, tokenizer, train_examples: list[Example], dev_examples: list[Example], *,
                    fractions: Sequence[float], finetune_steps: int, calibration_samples: int, dev_size: int,
                    threshold: float, max_length: int, seed: int = 0, batch_size: int = 32,
                    learning_rate: float = 5e-5) -> dict:
    """Dev accuracy of a fine-tuned classifier along Hu et al.'s iterations: iteration i trims the previous
    iteration's fine-tuned model to ``fractions[i]`` of the FFN neurons of every layer (cumulative, increasing) and
    fine-tunes it for ``finetune_steps`` (0: none). The random control runs the same iterations on a chain of its
    own. ``model`` is left alone. Calibration: ``calibration_samples`` training sentences drawn with ``seed``;
    fine-tuning: the training sentences shuffled with ``seed + 1``, each iteration starting where the last stopped;
    the random control's iteration i draws from a generator seeded ``seed + 1 + i``."""
    if list(fractions) != sorted(set(fractions)):
        raise ValueError(f"fractions are the cumulative targets of successive iterations: increasing, got {fractions}")
    dev = tokenized_batches(tokenizer, dev_examples[:dev_size], 128, max_length)
    calibration = tokenized_batches(tokenizer, random.Random(seed).sample(train_examples, calibration_samples),
                                    batch_size, max_length)
    finetune_batches = tokenized_batches(tokenizer, train_examples, batch_size, max_length, shuffle_seed=seed + 1)

    def accuracy(candidate: nn.Module, label: str) -> float:
        value = evaluate(candidate, dev, desc=label)["accuracy"]
        print(f"{label}: {value:.4f}", flush=True)
        return value

    dense_accuracy = accuracy(model, "dense")

    def prune(candidate: nn.Module, fraction: float, previous: dict | None) -> Pruned:
        keep, apoz = trim_ffn(candidate, fraction, threshold, calibration)
        if previous is not None and any((keep[n].bool() & ~previous[n].bool()).any() for n in keep):
            raise RuntimeError("an iteration revived a neuron the previous one pruned (its APoZ should be 1)")
        return Pruned(candidate, keep, apoz)

    def prune_randomly(candidate: nn.Module, counts: dict[str, int], generator: torch.Generator,
                       previous: dict | None) -> Pruned:
        if previous is None:
            previous = {name: torch.ones(candidate.get_submodule(name).out_features, dtype=torch.bool)
                        for name in counts}
        keep = random_keep(previous, counts, generator)
        zero_neurons(candidate, keep)
        return Pruned(candidate, keep)

    def finetune(candidate: nn.Module, iteration: int, label: str) -> None:
        offset = (iteration - 1) * finetune_steps % len(finetune_batches)  # each iteration sees the next batches
        finetune_holding_zeros(candidate, finetune_batches[offset:] + finetune_batches[:offset], finetune_steps,
                               learning_rate, seed, desc=f"fine-tune {label}")

    chains = run_trimming_iterations(
        model, list(fractions), prune, prune_randomly,
        generator_for=lambda iteration: torch.Generator().manual_seed(seed + 1 + iteration),
        evaluate=accuracy, finetune=finetune if finetune_steps > 0 else None)

    rows = []
    for apoz_row, random_row in zip(chains["apoz"].rows, chains["random"].rows):
        rows.append({"iteration": apoz_row.iteration, "fraction": apoz_row.setting, **{
            name: {"accuracy_pruned": row.accuracy_pruned, "accuracy_finetuned": row.accuracy_finetuned,
                   "neurons_pruned": row.pruned}  # cumulative: the masks cover every neuron
            for name, row in (("apoz", apoz_row), ("random", random_row))}})
    apoz = torch.cat(list(chains["apoz"].rows[0].apoz.values())).float()  # of the fine-tuned dense model
    apoz_quantiles = [round(float(q), 3) for q in torch.quantile(apoz, torch.tensor([0.1, 0.5, 0.9]))]
    return {"settings": {"threshold": threshold, "calibration_samples": calibration_samples,
                         "finetune_steps": finetune_steps, "batch_size": batch_size, "learning_rate": learning_rate,
                         "seed": seed, "scope": "local (each layer loses the same fraction)",
                         "iterations": "cumulative fractions; each iteration starts from the previous fine-tuned model"},
            "dev_examples": min(dev_size, len(dev_examples)), "dense_accuracy": dense_accuracy,
            "apoz_quantiles": apoz_quantiles, "rows": rows}
