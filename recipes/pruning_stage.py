"""Runs one recipe pruning stage through `inc_plugins.prepare_pruning` (one-shot or training-aware), slims a model
whose heads and neurons a structured stage removed (mask_search, flap, wanda_sp, structured_magnitude), and counts
the attention-head and FFN MACs a model still computes."""

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import inc_plugins
from inc_plugins.inc import one_shot
from inc_plugins.models.architectures import UnsupportedModelError
from inc_plugins.models.surgery_transformers import slimmed_sizes
from inc_plugins.inc.one_shot_base import PruningResult
from inc_plugins.models.structure_masks import MaskStructure, mask_structure
from inc_plugins.post_training import masked_macs

from .distillation import distillation_loss
from .movie_snippets import Example
from .schema import PruningStage, Quantize, RecipeError
from .text_classification import tokenized_batches, train


@dataclass
class StageOutcome:
    """What one pruning stage gives back besides the model it pruned in place: what the report says about how the
    stage was driven, and the pruner's returned result (a structured stage's masks, for slimming and MACs), if any."""

    report: dict
    result: PruningResult | None = None


def run_pruning_stage(model: torch.nn.Module, stage: PruningStage, tokenizer, train_examples: list[Example],
                      max_length: int) -> StageOutcome:
    """`prune_with_batches` for text classification: calibration samples are drawn from `train_examples` with the
    stage's seed; training (or fine-tuning) batches are all of them, shuffled with it."""
    one_shot = inc_plugins.is_one_shot(stage.pruning_type)
    training = None
    if not one_shot or stage.retrain_steps:
        training = tokenized_batches(tokenizer, train_examples, stage.batch_size, max_length, shuffle_seed=stage.seed)
    if not one_shot:
        return prune_with_batches(model, stage, training=training)
    calibration, n_calibration = calibration_batches(stage, tokenizer, train_examples, max_length)
    return prune_with_batches(model, stage, calibration=calibration, n_calibration=n_calibration, training=training)


def calibration_batches(stage: PruningStage | Quantize, tokenizer, train_examples: list[Example],
                        max_length: int) -> tuple[list, int]:
    """(batches, samples) of a one-shot (or quantize) stage's calibration: `calibration_samples` examples drawn with its
    seed, in batches of its `batch_size`."""
    sample = random.Random(stage.seed).sample(train_examples, min(stage.calibration_samples, len(train_examples)))
    return tokenized_batches(tokenizer, sample, stage.batch_size, max_length), len(sample)


def calibration_inputs(stage: PruningStage | Quantize, tokenizer, train_examples: list[Example],
                       max_length: int) -> list[dict]:
    """`calibration_batches` as model inputs (labels dropped): what a quantizer calibrates on."""
    batches, _ = calibration_batches(stage, tokenizer, train_examples, max_length)
    return [{name: tensor for name, tensor in batch.items() if name != "labels"} for batch in batches]


def prune_with_batches(model: torch.nn.Module, stage: PruningStage, calibration: list | None = None,
                       n_calibration: int | None = None, training: list | None = None) -> StageOutcome:
    """Prunes `model` in place through `inc_plugins.prepare_pruning`: one-shot types from the `calibration`
    batches (`n_calibration` samples in all), then fine-tuned on `training` for the stage's `retrain_steps`;
    training-aware ones while training on (cycled) `training` batches for the stage's `training_steps`.

    `prune_seconds` is the wall time of the pruning call alone (no tokenization, no evaluation, no fine-tuning)."""
    settings = stage.inc_settings()
    if inc_plugins.is_one_shot(stage.pruning_type):
        if stage.pruning_type == "mask_search" and "num_samples" not in settings:
            # say the count explicitly, so the Fisher estimate uses exactly the calibration samples drawn
            settings["num_samples"] = n_calibration
        config = inc_plugins.pruning_config(pruning_configs=[settings])
        # the model as it was before this stage: what the retraining learns, when it distils
        teacher = copy.deepcopy(model) if stage.distillation_temperature is not None else None
        start = time.perf_counter()
        pruning = inc_plugins.prepare_pruning(model, config, dataloader=calibration)
        report = {"mode": "one-shot", "calibration_samples": n_calibration,
                  "prune_seconds": round(time.perf_counter() - start, 3)}
        if stage.pruning_type == "mask_search":
            report["mask_search"] = mask_search_summary(pruning)
        elif stage.pruning_type in one_shot.structured_types():
            report["structure"] = structure_summary(pruning.result)
        if stage.retrain_steps:
            loss_of = None if teacher is None else distillation_loss(teacher, stage.distillation_temperature)
            report["retrain"] = finetune_holding_zeros(model, training, stage.retrain_steps, stage.learning_rate,
                                                        stage.seed, desc=f"fine-tune after {stage.pruning_type}",
                                                        loss_of=loss_of)
            report["retrain"]["distillation_temperature"] = stage.distillation_temperature
        return StageOutcome(report, pruning.result)

    if stage.training_steps < 1:
        raise RecipeError(
            f"pruning_type {stage.pruning_type!r} prunes during training: set training_steps >= 1 in its stage"
        )
    config = inc_plugins.pruning_config(pruning_configs=[settings])
    torch.manual_seed(stage.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.learning_rate)
    start = time.perf_counter()
    pruning = inc_plugins.prepare_pruning(model, config, optimizer=optimizer)
    pruning.on_train_begin()
    losses = train(model, training, stage.training_steps, stage.learning_rate, desc=f"prune ({stage.pruning_type})",
                   optimizer=optimizer, after_step=lambda _: pruning.on_step_end())
    pruning.on_train_end()
    inc_plugins.complete_pruning(model, optimizer)
    return StageOutcome({"mode": "training-aware", "training_steps": stage.training_steps, "final_loss": losses[-1],
                         "prune_seconds": round(time.perf_counter() - start, 3)})


def prune_checkpoint_stage(source: Path | torch.nn.Module, output: Path, stage: PruningStage, calibration: list,
                           n_calibration: int, memory_budget: int, resume: bool = False) -> StageOutcome:
    """One one-shot stage of a streamed run (`inc_plugins.prune_checkpoint`): checkpoint `source` (or the streamed
    model opened from it) pruned block by block into the new checkpoint `output` within `memory_budget` bytes
    (`resume`: continuing an interrupted run's partial output). The report adds the seconds each block was held,
    the process's peak RSS, the calibration activations kept on disk and the blocks taken from the interrupted run."""
    config = inc_plugins.pruning_config(pruning_configs=[stage.inc_settings()])
    start = time.perf_counter()
    try:
        run = inc_plugins.prune_checkpoint(source, output, config, dataloader=calibration, resume=resume,
                                           memory_budget=memory_budget)
    except (inc_plugins.CheckpointError, inc_plugins.PruningConfigError) as err:
        raise RecipeError(str(err)) from None
    return StageOutcome({"mode": "one-shot", "streamed": True, "calibration_samples": n_calibration,
                         "prune_seconds": round(time.perf_counter() - start, 3),
                         "seconds_per_block": [round(seconds, 3) for seconds in run.seconds_per_block],
                         "peak_rss_bytes": run.peak_rss_bytes, "activations_spilled_bytes": run.activations_spilled_bytes,
                         "world_size": run.world_size,
                         "samples_per_rank": run.samples_per_rank, "resumed_blocks": run.resumed_blocks}, run.result)


def finetune_holding_zeros(model: torch.nn.Module, batches: list, steps: int, learning_rate: float, seed: int,
                           desc: str = "fine-tune", loss_of=None) -> dict:
    """Fine-tunes a pruned model for `steps` steps over the (cycled) `batches` (on the labels, or on `loss_of`:
    `text_classification.train`); every weight that is exactly zero when it starts (what pruning removed) is set
    back to zero after each optimizer step, so the sparsity and the pruned structures survive."""
    with torch.no_grad():
        zeros = {name: p == 0 for name, p in model.named_parameters() if p.dtype.is_floating_point and not p.all()}
    parameters = dict(model.named_parameters())

    @torch.no_grad()
    def hold_zeros(_step: int) -> None:
        for name, mask in zeros.items():
            parameters[name].masked_fill_(mask, 0.0)

    torch.manual_seed(seed)
    start = time.perf_counter()
    losses = train(model, batches, steps, learning_rate, desc=desc, after_step=hold_zeros, loss_of=loss_of)
    return {"steps": steps, "learning_rate": learning_rate, "final_loss": losses[-1],
            "zeros_held": int(sum(int(mask.sum()) for mask in zeros.values())),
            "seconds": round(time.perf_counter() - start, 3)}


def mask_search_summary(pruning) -> dict:
    """What a mask_search pruning found: units kept per layer, and its cost against the budget."""
    result = pruning.result
    return {
        "constraint": result.constraint,
        "cost_unit": "MACs per sequence (heads + FFN neurons)" if result.constraint == "flops" else "seconds",
        "seq_len": result.seq_len,
        "dense_cost": result.dense_cost,
        "budget": result.budget,
        "cost": result.cost,
        "removed_fraction": 1 - result.cost / result.dense_cost,
        "kept_heads": (result.head_mask != 0).sum(dim=1).tolist(),
        "kept_neurons": (result.neuron_mask != 0).sum(dim=1).tolist(),
        "heads_per_layer": result.head_mask.shape[1],
        "neurons_per_layer": result.neuron_mask.shape[1],
        "width_multiple": result.width_multiple,
        "fisher_gradient_vectors": int(result.gradients.head.shape[0]),
        "per_sample_fisher": result.gradients.per_sample,
        "phase_seconds": result.phase_seconds,
        "tuning": None if result.tuning is None else tuning_summary(result.tuning),
        "step_checks": [{"step": check.step, "kept": check.kept, "samples": check.samples,
                         "positions": check.positions, "agreement_without": check.agreement_without,
                         "agreement_with": check.agreement_with} for check in result.step_checks],
    }


def structure_summary(result) -> dict:
    """What a flap, wanda_sp or structured_magnitude stage removed: units kept per layer, MACs against the target."""
    return {
        "cost_unit": "MACs per sequence (heads + FFN neurons)",
        "seq_len": result.seq_len,
        "dense_cost": result.dense_cost,
        "target_cost": result.target_cost,
        "cost": result.dense_cost - result.removed_cost,
        "removed_fraction": result.removed_fraction,
        "bias_compensated": result.bias_compensated,
        "kept_heads": (result.head_mask != 0).sum(dim=1).tolist(),
        "kept_neurons": (result.neuron_mask != 0).sum(dim=1).tolist(),
        "heads_per_layer": result.head_mask.shape[1],
        "neurons_per_layer": result.neuron_mask.shape[1],
    }


def tuning_summary(tuning) -> dict:
    """Each sub-layer's mask-tuning decision: scales kept or not, why not, and its held-out errors."""
    return {"heldout_samples": tuning.heldout_samples,
            "accepted": sum(entry.accepted for entry in tuning.log), "fits": len(tuning.log),
            "sublayers": [{"block": entry.layer, "part": entry.part, "kept_units": entry.n_kept,
                           "accepted": entry.accepted, "reason": entry.reason or None,
                           "heldout_error_untuned": entry.heldout_error_untuned,
                           "heldout_error_tuned": entry.heldout_error_tuned} for entry in tuning.log]}


# ------------------------------------------------------------------------------------------------ slimming, MACs


@torch.no_grad()
def slim_pruned_model(model: torch.nn.Module, probe_batch: dict, result) -> tuple[torch.nn.Module, dict]:
    """`inc_plugins.slim(model, result)`: the heads and neurons a structured stage zeroed are removed for real.

    The logits on `probe_batch` before and after are compared, so the report shows that slimming kept the outputs.
    """
    inputs = {k: v for k, v in probe_batch.items() if k != "labels"}
    masked = model(**inputs).logits
    slimmed = inc_plugins.slim(model, result)
    difference = (slimmed(**inputs).logits - masked).abs().max().item()
    return slimmed, {"max_abs_logit_difference_on_a_dev_batch": difference}


def structure_or_none(model: torch.nn.Module) -> MaskStructure | None:
    """Heads/neurons layout of a dense model, or None for families without one (their MACs are not reported)."""
    try:
        return mask_structure(model)
    except UnsupportedModelError:
        return None


def kept_unit_masks(model: torch.nn.Module, structure: MaskStructure, result=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit_head_mask [n_layers, n_head_units], neuron_mask [n_layers, n_neurons]), 1 = still computed.

    Read from the slimmed sizes, else from the masks of a structured stage's `result`, else everything is kept. Weights zeroed
    by other pruners do not count: dense kernels still multiply them."""
    units = torch.ones(structure.n_layers, structure.n_head_units)
    neurons = torch.ones(structure.n_layers, structure.n_neurons)
    sizes = slimmed_sizes(model)
    if sizes is not None:
        units.zero_()
        neurons.zero_()
        for layer, (heads, width) in enumerate(zip(sizes["heads"], sizes["intermediate_size"])):
            units[layer, [head // structure.heads_per_unit for head in heads]] = 1
            neurons[layer, :width] = 1
    elif result is not None:
        per_head = result.head_mask != 0
        units = per_head.view(structure.n_layers, structure.n_head_units, -1).any(dim=-1).float()
        neurons = (result.neuron_mask != 0).float()
    return units, neurons


def dense_prunable_macs(structure: MaskStructure, seq_len: int) -> int:
    """`prunable_macs` of the dense model that `structure` describes."""
    units, neurons = torch.ones(structure.n_layers, structure.n_head_units), torch.ones(structure.n_layers, structure.n_neurons)
    return int(masked_macs(structure, units, neurons, seq_len))


def prunable_macs(model: torch.nn.Module, structure: MaskStructure, seq_len: int, result=None) -> int:
    """MACs per sequence of `seq_len` tokens of the attention units and FFN neurons `model` computes: Kwon et
    al.'s accounting (embeddings, norms, biases and the task head left out). `structure` is the dense model's."""
    units, neurons = kept_unit_masks(model, structure, result)
    return int(masked_macs(structure, units, neurons, seq_len))
