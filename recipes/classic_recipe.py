"""Recipes for the classic pruning methods on scikit-learn's digits: schema and runner.

A digits recipe says ``task: digits_classification``; its ``model`` is one of the small networks of
``recipes/vision_models.py``, ``train`` is the training before pruning, and its one ``pruning`` stage is one of
the four classic procedures of ``recipes/classic_stages.py`` (every pruning decision goes through INC):

- ``network_slimming``: ``l1`` (sparsity training during ``train``, INC's ``bn_l1`` regulariser),
  ``target_sparsity`` (fraction of channels removed), ``pruning_scope``, ``finetune``;
- ``network_trimming``: ``target_sparsity`` (fraction of the remaining channels pruned per iteration),
  ``iterations``, ``apoz_threshold``, ``finetune`` (after every iteration);
- ``lottery_ticket``: ``prune_fraction`` (of the remaining weights per round), ``rounds``, ``rewind_to``
  (``init`` or ``step:k``), ``scope``, ``output_layer_rate``; the random re-initialisation control always runs;
- ``particle_filter``: ``target_sparsity``, ``granularity``, ``num_particles``, ``iterations``, ``stride``,
  ``retrain``.

A run writes ``<output.dir>/<name>-<UTC time>/`` (or ``--run-dir``) with the pruned model (``model/``, load it
with ``recipes.vision_models.load_digits_model``), the resolved recipe and ``report.json``; the directory appears
only when the run succeeded.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from .recipe_base import (BatchSize, Description, Fraction, LearningRate, LocalPath, RecipeName, Seed, Strict,
                          validation_error)

TASK = "digits_classification"


class DigitsModel(Strict):
    architecture: Literal["digits_cnn", "digits_mlp"]
    # default: (32, 64, 128) / (300, 100); 4096 channels or neurons is far beyond what 8x8 digits need
    widths: Annotated[list[Annotated[int, Field(ge=1, le=4096)]], Field(max_length=8)] | None = None
    seed: Seed = 0

    @model_validator(mode="after")
    def _widths_fit(self):
        expected = 3 if self.architecture == "digits_cnn" else 2
        if self.widths is not None and len(self.widths) != expected:
            raise ValueError(f"{self.architecture} takes {expected} widths, got {self.widths}")
        return self


class DigitsData(Strict):
    dataset: Literal["digits"] = "digits"
    seed: Seed = 0
    test_fraction: Fraction = 0.2
    val_fraction: Fraction = 0.2

    @model_validator(mode="after")
    def _leaves_training_images(self):
        if self.test_fraction + self.val_fraction >= 1:
            raise ValueError("test_fraction + val_fraction must be < 1 (the rest are the training images)")
        return self


class Training(Strict):
    epochs: Annotated[int, Field(ge=1, le=1000)] = 30  # 1000 epochs of digits is hours on 2 cores
    batch_size: BatchSize = 64
    learning_rate: LearningRate = 2e-3
    # decay of 1 or more per step shrinks every weight to nothing (or, with Adam, to NaN)
    weight_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: Seed = 0

    def settings(self):
        from .classic_stages import TrainSettings

        return TrainSettings(**self.model_dump())


class SlimmingStage(Strict):
    pruning_type: Literal["network_slimming"]
    target_sparsity: Fraction
    pattern: Literal["1xchannel"] = "1xchannel"
    pruning_scope: Literal["global", "local"] = "global"
    l1: Annotated[float, Field(gt=0, le=10)] = 1e-2  # the BN-scale L1 coefficient of the sparsity training
    finetune: Training = Field(default_factory=Training)


class TrimmingStage(Strict):
    pruning_type: Literal["network_trimming"]
    target_sparsity: Fraction  # per iteration, of the remaining channels
    pattern: Literal["1xchannel"] = "1xchannel"
    iterations: Annotated[int, Field(ge=1, le=100)] = 1  # each iteration fine-tunes the network again
    apoz_threshold: Annotated[float, Field(ge=0, le=1e6)] | None = None
    finetune: Training = Field(default_factory=Training)


class LotteryStage(Strict):
    pruning_type: Literal["lottery_ticket"]
    prune_fraction: Fraction = 0.2
    rounds: Annotated[int, Field(ge=1, le=100)] = 10  # each round trains the network twice (ticket and control)
    rewind_to: Annotated[str, Field(pattern=r"^(init|step:[1-9][0-9]{0,6})$")] = "init"
    scope: Literal["layer", "global"] = "layer"
    output_layer_rate: Fraction | None = None


class ParticleFilterStage(Strict):
    pruning_type: Literal["particle_filter"]
    target_sparsity: Fraction
    granularity: Literal["channel", "kernel", "intra_kernel"] = "channel"
    # each particle of each iteration is one evaluation of the network on the validation images
    num_particles: Annotated[int, Field(ge=1, le=10_000)] = 16
    iterations: Annotated[int, Field(ge=1, le=10_000)] = 6
    stride: Annotated[int, Field(ge=2, le=64)] = 2
    seed: Seed = 0
    retrain: Training = Field(default_factory=Training)


Stage = Annotated[SlimmingStage | TrimmingStage | LotteryStage | ParticleFilterStage,
                  Field(discriminator="pruning_type")]


class Output(Strict):
    dir: LocalPath = Path("runs")


class DigitsRecipe(Strict):
    name: RecipeName
    description: Description = ""
    task: Literal["digits_classification"]
    model: DigitsModel
    data: DigitsData = Field(default_factory=DigitsData)
    train: Training = Field(default_factory=Training)
    pruning: Annotated[list[Stage], Field(min_length=1, max_length=1)]
    output: Output = Field(default_factory=Output)

    @model_validator(mode="after")
    def _stage_fits_model(self):
        stage = self.pruning[0]
        if stage.pruning_type in ("network_slimming", "particle_filter") and self.model.architecture != "digits_cnn":
            raise ValueError(f"{stage.pruning_type} prunes convolution channels/kernels: use architecture digits_cnn")
        return self


def is_digits_recipe(data: Any) -> bool:
    """Whether a parsed YAML document is a digits recipe (``task: digits_classification``)."""
    return isinstance(data, dict) and data.get("task") == TASK


def parse_digits_recipe(data: Any, source: str = "recipe") -> DigitsRecipe:
    """A validated digits recipe; RecipeError names every bad key, what was given and what is allowed."""
    try:
        return DigitsRecipe.model_validate(data)
    except ValidationError as error:
        raise validation_error(error, DigitsRecipe, source, "digits recipe") from None


# ------------------------------------------------------------------------------------------------------ running


def _size(model) -> dict:
    from .vision_models import macs_per_image

    return {"widths": list(model.widths()), "parameters": sum(p.numel() for p in model.parameters()),
            "nonzero_parameters": sum(int((p != 0).sum()) for p in model.parameters()),
            "macs_per_image": macs_per_image(model)}


def _run_stage(recipe: DigitsRecipe, split, report: dict):
    """Trains and prunes as the stage says; returns the pruned model and fills ``report``."""
    from . import classic_stages as cs
    from .vision_models import build_digits_model

    stage, train = recipe.pruning[0], recipe.train.settings()
    model_spec = recipe.model

    def fresh():
        return build_digits_model(model_spec.architecture, model_spec.widths, seed=model_spec.seed)

    if stage.pruning_type == "lottery_ticket":
        rounds = cs.lottery_tickets(model_spec.architecture, split, train, stage.rounds, stage.prune_fraction,
                                    stage.rewind_to, model_spec.seed, stage.scope, stage.output_layer_rate,
                                    model_spec.widths)
        report["rounds"] = [{"round": r.round, "remaining_fraction": r.remaining_fraction,
                             "ticket_accuracy": r.ticket_accuracy, "random_accuracy": r.random_accuracy}
                            for r in rounds]
        report["accuracy_before"] = rounds[0].ticket_accuracy
        # the last round's winning ticket, rebuilt: rewind it and train it again under its mask
        ticket = _rebuild_ticket(fresh(), rounds[-1].masks, stage, replace(train, seed=train.seed + model_spec.seed),
                                 split)
        return ticket, rounds[-1].masks

    model = fresh()
    if stage.pruning_type == "network_slimming":
        cs.sparsity_train(model, split, train, stage.l1)
        report["accuracy_before"] = cs.accuracy_on_test(model, split)
        report["bn_scales"] = cs.bn_scale_summary(model)
        slimmed = cs.slim_by_bn_scales(model, stage.target_sparsity, split, stage.pruning_scope)
        report["max_abs_logit_difference_slimmed_vs_masked"] = slimmed.max_abs_difference
        report["accuracy_pruned"] = cs.accuracy_on_test(slimmed.slimmed, split)
        cs.train_digits(slimmed.slimmed, split, stage.finetune.settings())
        return slimmed.slimmed, None
    cs.train_digits(model, split, train)
    report["accuracy_before"] = cs.accuracy_on_test(model, split)
    report["size_before"] = _size(model)
    if stage.pruning_type == "network_trimming":
        steps = []
        for iteration in range(stage.iterations):
            model, keep, apoz = cs.trim_once(model, stage.target_sparsity, split, threshold=stage.apoz_threshold)
            pruned = cs.accuracy_on_test(model, split)
            cs.train_digits(model, split, stage.finetune.settings())
            steps.append({"iteration": iteration + 1, "widths": list(model.widths()), "accuracy_pruned": pruned,
                          "accuracy_finetuned": cs.accuracy_on_test(model, split)})
        report["iterations"] = steps
        return model, None
    outcome = cs.particle_filter_pruning(model, split, stage.granularity, stage.target_sparsity,
                                         stage.retrain.settings(), stage.num_particles, stage.iterations,
                                         stage.stride, stage.seed)
    report.update({"accuracy_pruned": outcome.accuracy_pruned, "weight_sparsity": outcome.sparsity,
                   "search_seconds": outcome.search_seconds, "evaluations": outcome.evaluations})
    return outcome.model, None if stage.granularity == "channel" else outcome.masks


def _rebuild_ticket(model, masks, stage, train, split):
    """The final winning ticket: the same rewinding point, the mask, and the same training as its round."""
    from inc_plugins.algorithms.lottery_ticket import enforce_masks, prunable_layers

    from . import classic_stages as cs

    layers = prunable_layers(model)
    if stage.rewind_to != "init":
        # theta_k: the dense network after k steps of the same training
        k = int(stage.rewind_to.split(":")[1])
        saved = {}

        def save(step):
            if step == k:
                saved.update({key: v.detach().clone() for key, v in model.state_dict().items()})

        cs.train_digits(model, split, train, after_step=save)
        if not saved:
            raise ValueError(f"rewind_to {stage.rewind_to}: training has fewer than {k} steps")
        model.load_state_dict(saved)
    with enforce_masks(layers, masks):
        cs.train_digits(model, split, train)
    return model


def run_digits_recipe(recipe: DigitsRecipe, run_dir: Path | None = None, *, overwrite: bool = False,
                      allow_outside_cwd: bool = False) -> Path:
    """Runs the recipe; returns its run directory, which appears only once everything succeeded (a failure leaves
    ``<run>.failed`` with the report so far, as for every recipe)."""
    from inc_plugins.algorithms.lottery_ticket import remaining_fraction

    from .atomic import write_text
    from .classic_stages import accuracy_on_test
    from .digits import load_digits_split
    from .report import environment
    from .run_dir import check_run_dir, fresh_path, staged_run
    from .vision_models import save_digits_model

    started = datetime.now(timezone.utc)
    default = fresh_path(recipe.output.dir / f"{recipe.name}-{started.strftime('%Y%m%dT%H%M%SZ')}")
    run_dir = check_run_dir(run_dir or default, overwrite, allow_outside_cwd)  # digits read no local files
    start = time.perf_counter()
    with staged_run(run_dir, overwrite) as staged:
        report = staged.report
        report.update(recipe=recipe.name, description=recipe.description, task=recipe.task,
                      started=started.isoformat(), environment=environment())
        write_text(staged.path / "recipe.yaml",
                   yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False))
        split = load_digits_split(recipe.data.seed, recipe.data.test_fraction, recipe.data.val_fraction)
        report["data"] = split.sizes()
        staged.current_stage = f"train_and_prune ({recipe.pruning[0].pruning_type})"
        model, masks = _run_stage(recipe, split, report)
        staged.stage_done("train_and_prune")
        report["accuracy_after"] = accuracy_on_test(model, split)
        report["size_after"] = _size(model)
        if masks is not None:
            report["weights_remaining_in_pruned_layers"] = remaining_fraction(masks)
        report["seconds"] = round(time.perf_counter() - start, 3)
        report["model"] = {"load": f"from recipes.vision_models import load_digits_model; "
                                   f"model = load_digits_model({str(run_dir / 'model')!r})"}
        staged.current_stage = "save"
        save_digits_model(model, staged.path / "model")
        staged.stage_done("save")
    print(f"test accuracy before pruning {report['accuracy_before']:.4f}, after {report['accuracy_after']:.4f}; "
          f"widths {report['size_after']['widths']}, {report['size_after']['nonzero_parameters']:,} non-zero "
          f"parameters\nrun directory: {run_dir}")
    return run_dir
