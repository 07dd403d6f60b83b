"""Runs a recipe end to end: load, fine-tune (cached), evaluate, prune, slim (optional), evaluate, save, report.

    python -m recipes.apply minilm_sentiment.yaml      # a bare name is looked up in recipes/
    python -m recipes.apply path/to/my_recipe.yaml
"""

import argparse
import contextlib
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from inc_plugins.models.slimming import save_slimmed
from inc_plugins.post_training.data import average_sequence_length

from . import finetune_cache
from .atomic import staged_directory, write_json, write_text
from .model_sources import load_classifier
from .movie_snippets import load_examples, train_dev_split
from .pruning_stage import dense_prunable_macs, prunable_macs, run_pruning_stage, slim_pruned_model, structure_or_none
from .report import environment, layer_sparsity, parameter_counts
from .schema import Recipe, RecipeError, load_recipe
from .text_classification import epochs_to_steps, evaluate, tokenized_batches, train

LOAD_SLIMMED = "from inc_plugins.models.slimming import load_slimmed; model = load_slimmed({path!r})"


class StageTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        print(f"[{name}]", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


def _finetuned(recipe: Recipe, model, tokenizer, train_examples, timer: StageTimer):
    """The fine-tuned (model, tokenizer, info), from the cache when an identical fine-tune was done before."""
    key = finetune_cache.finetune_key(recipe.model, recipe.data, recipe.finetune)
    cached = finetune_cache.load_cached(key)
    if cached is not None:
        print(f"  reusing cached fine-tuned model {finetune_cache.cached_dir(key)}")
        model, tokenizer, info = cached
        return model, tokenizer, {**info, "cached": True}
    with timer("finetune"):
        torch.manual_seed(recipe.finetune.seed)
        batches = tokenized_batches(tokenizer, train_examples, recipe.finetune.batch_size, recipe.data.max_length,
                                    shuffle_seed=recipe.finetune.seed)
        steps = epochs_to_steps(recipe.finetune.epochs, len(batches))
        losses = train(model, batches, steps, recipe.finetune.learning_rate, desc="fine-tune")
    info = {"key": key, "steps": steps, "final_loss": losses[-1], "seconds": timer.seconds["finetune"]}
    finetune_cache.store(key, model, tokenizer, info)
    return model, tokenizer, {**info, "cached": False}


def _fresh_run_dir(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`, ... when runs started within the same second."""
    candidate, suffix = base, 2
    while candidate.exists():
        candidate, suffix = base.with_name(f"{base.name}-{suffix}"), suffix + 1
    return candidate


def prepare_task(recipe: Recipe, timer: StageTimer | None = None):
    """(model, tokenizer, train_examples, dev_examples, finetune_info): the recipe's model, fine-tuned when the
    recipe says so (from the cache when an identical fine-tune was done before), and its data split."""
    timer = timer or StageTimer()
    with timer("load"):
        model, tokenizer = load_classifier(recipe.model)
        train_examples, dev_examples = train_dev_split(load_examples(), recipe.data.dev_size, recipe.data.seed)
        if recipe.data.max_train_samples is not None:
            train_examples = train_examples[: recipe.data.max_train_samples]
    finetune_info = None
    if recipe.finetune is not None:
        model, tokenizer, finetune_info = _finetuned(recipe, model, tokenizer, train_examples, timer)
    return model, tokenizer, train_examples, dev_examples, finetune_info


def _macs_seq_len(stages: list[dict], dev_batches: list[dict]) -> int:
    """The sequence length MACs are reported at: the one a FLOPs-constrained mask_search budgeted for (so the
    report can be checked against its budget), else the dev set's average non-padding length."""
    for stage in reversed(stages):
        searched = stage.get("mask_search") or {}
        if searched.get("seq_len"):
            return searched["seq_len"]
    return average_sequence_length(dev_batches)


def run(recipe: Recipe, run_dir: Path | None = None) -> Path:
    """Runs the recipe and returns its run directory, which appears only once everything succeeded."""
    timer = StageTimer()
    started = datetime.now(timezone.utc)
    run_dir = run_dir or _fresh_run_dir(recipe.output.dir / f"{recipe.name}-{started.strftime('%Y%m%dT%H%M%SZ')}")
    if run_dir.exists():
        raise RecipeError(f"run directory {run_dir} already exists; refusing to overwrite it")

    model, tokenizer, train_examples, dev_examples, finetune_info = prepare_task(recipe, timer)

    dev_batches = tokenized_batches(tokenizer, dev_examples, recipe.evaluation.batch_size, recipe.data.max_length)
    with timer("evaluate_before"):
        before = evaluate(model, dev_batches, desc="evaluate dense")
    params_before = parameter_counts(model)
    structure = structure_or_none(model)  # of the dense model: a slimmed one has layers of different sizes

    stages = []
    for index, stage in enumerate(recipe.pruning):
        with timer(f"prune_{index}_{stage.pruning_type}"):
            stages.append({"settings": stage.model_dump(mode="json", exclude_none=True),
                           **run_pruning_stage(model, stage, tokenizer, train_examples, recipe.data.max_length)})

    slimming = None
    if recipe.slim:
        with timer("slim"):
            model, slimming = slim_pruned_model(model, dev_batches[0])

    with timer("evaluate_after"):
        after = evaluate(model, dev_batches, desc="evaluate pruned")

    macs = None
    if structure is not None:
        seq_len = _macs_seq_len(stages, dev_batches)
        dense_macs, kept_macs = dense_prunable_macs(structure, seq_len), prunable_macs(model, structure, seq_len)
        macs = {"accounting": "MACs per sequence of the attention heads and FFN neurons (Kwon et al. 2022); "
                              "embeddings, norms, biases and the task head are not counted; zeroed weights in "
                              "dense kernels still count",
                "seq_len": seq_len, "before": dense_macs, "after": kept_macs,
                "removed_fraction": 1 - kept_macs / dense_macs}

    sparsity = layer_sparsity(model)
    report = {
        "recipe": recipe.name,
        "started": started.isoformat(),
        "data": {"train_examples": len(train_examples), "dev_examples": len(dev_examples),
                 "note": "movie-snippet sentiment (SST-2-like), not the official SST-2 labels or split"},
        "finetune": finetune_info,
        "metrics": {"before": before, "after": after},
        "parameters": {"before": params_before, "after": parameter_counts(model)},
        "macs": macs,
        "pruning_stages": stages,
        "model": {"slimmed": recipe.slim,
                  "load": LOAD_SLIMMED.format(path=str(run_dir / "model")) if recipe.slim else
                          f"AutoModelForSequenceClassification.from_pretrained({str(run_dir / 'model')!r})",
                  **({"slimming_check": slimming} if slimming else {})},
        "layer_sparsity": sparsity,
        "stage_seconds": timer.seconds,
        "environment": environment(),
    }
    with timer("save"), staged_directory(run_dir) as staging:
        if recipe.slim:
            save_slimmed(model, staging / "model")
        else:
            model.save_pretrained(staging / "model", safe_serialization=True)
        tokenizer.save_pretrained(staging / "model")
        write_text(staging / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False))
        write_json(staging / "report.json", report)
    _print_summary(report, run_dir)
    return run_dir


def _print_summary(report: dict, run_dir: Path) -> None:
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    params = report["parameters"]
    rows = [
        ("dev accuracy", f"{before['accuracy']:.4f}", f"{after['accuracy']:.4f}"),
        ("dev F1", f"{before.get('f1', float('nan')):.4f}", f"{after.get('f1', float('nan')):.4f}"),
        ("parameters", f"{params['before']['total']:,}", f"{params['after']['total']:,}"),
        ("non-zero parameters", f"{params['before']['nonzero']:,}", f"{params['after']['nonzero']:,}"),
    ]
    if report.get("macs"):
        macs = report["macs"]
        rows.append((f"head+FFN MACs @{macs['seq_len']} tok", f"{macs['before']:,}", f"{macs['after']:,}"))
    print(f"\n{'':22}{'before':>14}{'after':>14}")
    for label, b, a in rows:
        print(f"{label:22}{b:>14}{a:>14}")
    print(f"\nrun directory: {run_dir}")
    print(f"load it with: {report['model']['load']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.apply", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a recipe file, or the bare name of a shipped recipe in recipes/")
    parser.add_argument("--run-dir", type=Path, help="where to write this run (default: <output.dir>/<name>-<time>)")
    parser.add_argument("--verbose", action="store_true", help="show INC's own INFO logs (every pruning step)")
    args = parser.parse_args(argv)
    if not args.verbose:
        logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    try:
        run(load_recipe(args.recipe), args.run_dir)
    except (RecipeError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
