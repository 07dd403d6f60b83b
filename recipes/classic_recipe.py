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

import difflib
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TASK = "digits_classification"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DigitsModel(_Strict):
    architecture: Literal["digits_cnn", "digits_mlp"]
    widths: list[Annotated[int, Field(ge=1)]] | None = None  # default: (32, 64, 128) / (300, 100)
    seed: int = 0

    @model_validator(mode="after")
    def _widths_fit(self):
        expected = 3 if self.architecture == "digits_cnn" else 2
        if self.widths is not None and len(self.widths) != expected:
            raise ValueError(f"{self.architecture} takes {expected} widths, got {self.widths}")
        return self


class DigitsData(_Strict):
    dataset: Literal["digits"] = "digits"
    seed: int = 0
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2

    @model_validator(mode="after")
    def _leaves_training_images(self):
        if self.test_fraction + self.val_fraction >= 1:
            raise ValueError("test_fraction + val_fraction must be < 1 (the rest are the training images)")
        return self


class Training(_Strict):
    epochs: Annotated[int, Field(ge=1)] = 30
    batch_size: Annotated[int, Field(ge=1)] = 64
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = 2e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: int = 0

    def settings(self):
        from .classic_stages import TrainSettings

        return TrainSettings(**self.model_dump())


class SlimmingStage(_Strict):
    pruning_type: Literal["network_slimming"]
    target_sparsity: Annotated[float, Field(gt=0, lt=1)]
    pattern: Literal["1xchannel"] = "1xchannel"
    pruning_scope: Literal["global", "local"] = "global"
    l1: Annotated[float, Field(gt=0)] = 1e-2  # the BN-scale L1 coefficient of the sparsity training
    finetune: Training = Field(default_factory=Training)


class TrimmingStage(_Strict):
    pruning_type: Literal["network_trimming"]
    target_sparsity: Annotated[float, Field(gt=0, lt=1)]  # per iteration, of the remaining channels
    pattern: Literal["1xchannel"] = "1xchannel"
    iterations: Annotated[int, Field(ge=1)] = 1
    apoz_threshold: Annotated[float, Field(ge=0)] | None = None
    finetune: Training = Field(default_factory=Training)


class LotteryStage(_Strict):
    pruning_type: Literal["lottery_ticket"]
    prune_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    rounds: Annotated[int, Field(ge=1)] = 10
    rewind_to: Annotated[str, Field(pattern=r"^(init|step:[1-9][0-9]*)$")] = "init"
    scope: Literal["layer", "global"] = "layer"
    output_layer_rate: Annotated[float, Field(gt=0, lt=1)] | None = None


class ParticleFilterStage(_Strict):
    pruning_type: Literal["particle_filter"]
    target_sparsity: Annotated[float, Field(gt=0, lt=1)]
    granularity: Literal["channel", "kernel", "intra_kernel"] = "channel"
    num_particles: Annotated[int, Field(ge=1)] = 16
    iterations: Annotated[int, Field(ge=1)] = 6
    stride: Annotated[int, Field(ge=2)] = 2
    seed: int = 0
    retrain: Training = Field(default_factory=Training)


Stage = Annotated[SlimmingStage | TrimmingStage | LotteryStage | ParticleFilterStage,
                  Field(discriminator="pruning_type")]


class Output(_Strict):
    dir: Path = Path("runs")


class DigitsRecipe(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
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


def _allowed_keys(data: Any, loc: tuple) -> list[str]:
    """The keys allowed where an unknown key sits, for 'did you mean' hints."""
    node: Any = DigitsRecipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if part in ("network_slimming", "network_trimming", "lottery_ticket", "particle_filter"):
            node = {"network_slimming": SlimmingStage, "network_trimming": TrimmingStage,
                    "lottery_ticket": LotteryStage, "particle_filter": ParticleFilterStage}[part]
            continue
        field = node.model_fields.get(part) if isinstance(node, type) and issubclass(node, BaseModel) else None
        if field is None:
            return []
        annotation = field.annotation
        while not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
            if not args:
                return []
            annotation = args[0]
        node = annotation
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def parse_digits_recipe(data: Any, source: str = "recipe") -> DigitsRecipe:
    """A validated digits recipe; RecipeError names every bad key, what was given and what is allowed."""
    from .schema import RecipeError

    try:
        return DigitsRecipe.model_validate(data)
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            where = ".".join(str(part) for part in problem["loc"])
            if problem["type"] == "extra_forbidden":
                allowed = _allowed_keys(data, problem["loc"])
                close = difflib.get_close_matches(str(problem["loc"][-1]), allowed, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                lines.append(f"unknown key '{where}'.{hint} Allowed here: {', '.join(allowed)}")
            else:
                given = "" if isinstance(problem.get("input"), dict) else f" (got {problem.get('input')!r})"
                lines.append(f"'{where}': {problem['msg']}{given}")
        raise RecipeError(f"{source} is not a valid digits recipe:\n  " + "\n  ".join(lines)) from None


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
    run_dir = check_run_dir(run_dir or default, overwrite, allow_outside_cwd)
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
