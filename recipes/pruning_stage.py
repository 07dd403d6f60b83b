"""Runs one recipe pruning stage through `inc_plugins.prepare_pruning`: one-shot or training-aware."""

import random

import torch

import inc_plugins

from .movie_snippets import Example
from .schema import PruningStage, RecipeError
from .text_classification import tokenized_batches, train


def run_pruning_stage(model: torch.nn.Module, stage: PruningStage, tokenizer, train_examples: list[Example],
                      max_length: int) -> dict:
    """Prunes `model` in place; returns what the report should say about how it was driven."""
    config = inc_plugins.pruning_config(pruning_configs=[stage.inc_settings()])
    if inc_plugins.is_one_shot(stage.pruning_type):
        sample = random.Random(stage.seed).sample(train_examples, min(stage.calibration_samples, len(train_examples)))
        calibration = tokenized_batches(tokenizer, sample, stage.batch_size, max_length)
        inc_plugins.prepare_pruning(model, config, dataloader=calibration)
        return {"mode": "one-shot", "calibration_samples": len(sample)}

    if stage.training_steps < 1:
        raise RecipeError(
            f"pruning_type {stage.pruning_type!r} prunes during training: set training_steps >= 1 in its stage"
        )
    torch.manual_seed(stage.seed)
    batches = tokenized_batches(tokenizer, train_examples, stage.batch_size, max_length, shuffle_seed=stage.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.learning_rate)
    pruning = inc_plugins.prepare_pruning(model, config, optimizer=optimizer)
    pruning.on_train_begin()
    losses = train(model, batches, stage.training_steps, stage.learning_rate, desc=f"prune ({stage.pruning_type})",
                   optimizer=optimizer, after_step=lambda _: pruning.on_step_end())
    pruning.on_train_end()
    inc_plugins.complete_pruning(model, optimizer)
    return {"mode": "training-aware", "training_steps": stage.training_steps, "final_loss": losses[-1]}
