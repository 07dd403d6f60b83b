"""Batching, training and evaluation for single-sentence and sentence-pair classification."""

import math
import random
from collections.abc import Callable, Iterator

import torch

from inc_plugins.finite_checks import check_outputs, check_trained_weights, check_training_loss
from inc_plugins.progress import progress

from .movie_snippets import Example


def tokenized_batches(tokenizer, examples: list[Example], batch_size: int, max_length: int,
                      shuffle_seed: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Padded batches with `labels`; shuffled with the seed when one is given."""
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        pairs = [e.text_pair for e in chunk] if chunk[0].text_pair is not None else None
        # sentence pairs are truncated longest-first, as GLUE pair tasks are
        encoded = tokenizer([e.text for e in chunk], pairs, padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
        encoded = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        encoded["labels"] = torch.tensor([e.label for e in chunk])
        batches.append(encoded)
    return batches


def cycle(batches: list) -> Iterator:
    while True:
        yield from batches


def train(model: torch.nn.Module, batches: list[dict], steps: int, learning_rate: float, desc: str,
          optimizer: torch.optim.Optimizer | None = None,
          after_step: Callable[[int], None] | None = None,
          loss_of: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None) -> list[float]:
    """AdamW with linear decay for `steps` steps over the (cycled) batches; returns the loss of each step. The loss
    is the model's own (the labels') unless `loss_of(model, batch)` is given (`recipes.distillation`).

    A non-finite loss (checked every step) or weight (checked at the end) raises NonFiniteError naming the step."""
    model.train()
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))
    losses = []
    steps_done = progress(range(steps), desc=desc, unit="step", leave=True)
    for step, batch in zip(steps_done, cycle(batches)):
        loss = model(**batch).loss if loss_of is None else loss_of(model, batch)
        losses.append(loss.item())
        check_training_loss(model, losses[-1], step + 1, desc)  # before the update spreads NaN to every weight
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if after_step is not None:
            after_step(step)
        steps_done.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    check_trained_weights(model, steps, desc)
    model.eval()
    return losses


def epochs_to_steps(epochs: float, n_batches: int) -> int:
    return max(1, math.ceil(epochs * n_batches))


def evaluated_model(desc: str) -> str:
    """What an evaluation's `desc` ("evaluate dense", "evaluate pruned") evaluates, for error messages."""
    return next((f"the {word} model" for word in ("dense", "pruned") if word in desc.split()), "the model")


@torch.no_grad()
def predict(model: torch.nn.Module, batches: list[dict], desc: str = "evaluate") -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, labels) of every example of `batches`, in order. NonFiniteError when the logits hold NaN
    or Inf (argmax would rank them silently)."""
    model.eval()
    predictions, labels = [], []
    for index, batch in enumerate(progress(batches, desc=desc, unit="batch")):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        check_outputs(model, logits, "logits", evaluated_model(desc), index)
        predictions.append(logits.argmax(-1))
        labels.append(batch["labels"])
    return torch.cat(predictions), torch.cat(labels)


def classification_metrics(pred: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """Accuracy and (for two classes) F1 of the positive class."""
    metrics = {"accuracy": (pred == gold).float().mean().item(), "examples": len(gold)}
    if int(gold.max()) <= 1:
        tp = ((pred == 1) & (gold == 1)).sum().item()
        precision = tp / max(1, (pred == 1).sum().item())
        recall = tp / max(1, (gold == 1).sum().item())
        metrics["f1"] = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
    return metrics


def evaluate(model: torch.nn.Module, batches: list[dict], desc: str = "evaluate") -> dict[str, float]:
    """`classification_metrics` of `predict`."""
    return classification_metrics(*predict(model, batches, desc))
