"""The image_classification task: a small network trained from scratch on scikit-learn's digits, pruned by the
classic methods (every pruning decision goes through INC; the procedures live in `classic_stages`).

It offers the same interface as the text tasks (`recipes.tasks`), so `apply.run` runs it the same way: `load`
builds and trains the network (with network slimming's L1 on the BatchNorm scales when its stage comes first),
each `prune` runs one stage and may return a smaller network, `evaluate` is accuracy on the test images.
"""

from dataclasses import replace
from pathlib import Path

import torch

from inc_plugins.algorithms.lottery_ticket import remaining_fraction
from inc_plugins.execution.held_masks import enforce_masks
from inc_plugins.models.cnn_structure import prunable_layers

from . import classic_stages as cs
from .digits import load_digits_split
from .pruning_stage import StageOutcome
from .report import parameter_counts
from .schema import ImageClassificationRecipe, ImageStage, Training
from .vision_models import build_digits_model, macs_per_image, save_digits_model

LOAD_DIGITS = "from recipes.vision_models import load_digits_model; model = load_digits_model({path!r})"
# Cumulative targets are written with a few decimals; the fraction of what remains is rounded to this many, so
# that e.g. 0.51 after 0.3 prunes exactly 0.3 of the remaining neurons, as the paper's iterations do.
FRACTION_DIGITS = 12


def train_settings(training: Training) -> cs.TrainSettings:
    return cs.TrainSettings(**training.model_dump())


class ImageClassificationTask:
    """Digits classification; accuracy on the test images (the validation images calibrate the pruners)."""

    evaluated_on = "test"
    finetune_info = None  # the network is trained from scratch in `load`, never fine-tuned from a checkpoint

    def __init__(self, recipe: ImageClassificationRecipe):
        self.recipe = recipe
        self.trimmed_fraction = 0.0  # of the original hidden units, after the trimming stages so far

    def _fresh_model(self) -> torch.nn.Module:
        spec = self.recipe.model
        return build_digits_model(spec.architecture, spec.widths, seed=spec.seed)

    def _dense_training(self) -> cs.TrainSettings:
        train = train_settings(self.recipe.train)
        if self.recipe.pruning[0].pruning_type == "lottery_ticket":
            # the lottery rounds train every network with the model seed added (their dense round 0 included)
            return replace(train, seed=train.seed + self.recipe.model.seed)
        return train

    def load(self, timer) -> torch.nn.Module:
        """Builds the network and the split, and trains it: the dense model that the stages prune."""
        data = self.recipe.data
        with timer("load"):
            self.split = load_digits_split(data.seed, data.test_fraction, data.val_fraction)
            model = self._fresh_model()
        with timer("train"):
            first = self.recipe.pruning[0]
            if first.pruning_type == "network_slimming":
                cs.sparsity_train(model, self.split, self._dense_training(), first.l1)
            else:
                cs.train_digits(model, self.split, self._dense_training())
        return model

    def check_stage(self, model: torch.nn.Module, stage: ImageStage, where: str) -> None:
        """The digits stages prune whole channels or single weights: every shape fits."""

    def evaluate(self, model: torch.nn.Module, desc: str) -> dict:
        return {"accuracy": cs.accuracy_on_test(model, self.split)}

    def size(self, model: torch.nn.Module) -> dict:
        return {**parameter_counts(model), "widths": list(model.widths()), "macs_per_image": macs_per_image(model)}

    def prune(self, model: torch.nn.Module, stage: ImageStage) -> tuple[torch.nn.Module, StageOutcome]:
        """Runs one stage; returns the pruned (and retrained) network, often a physically smaller one, and what
        the report says about the stage."""
        model, report = self._prune(model, stage)
        return model, StageOutcome(report)

    def _prune(self, model: torch.nn.Module, stage: ImageStage) -> tuple[torch.nn.Module, dict]:
        report: dict = {}
        if stage.pruning_type == "network_slimming":
            report["bn_scales"] = cs.bn_scale_summary(model)
            slimmed = cs.slim_by_bn_scales(model, stage.target_sparsity, self.split, stage.pruning_scope)
            report["max_abs_logit_difference_slimmed_vs_masked"] = slimmed.max_abs_difference
            report["accuracy_pruned"] = cs.accuracy_on_test(slimmed.slimmed, self.split)
            cs.train_digits(slimmed.slimmed, self.split, train_settings(stage.retrain))
            return slimmed.slimmed, report
        if stage.pruning_type == "network_trimming":
            fraction = round(1 - (1 - stage.target_sparsity) / (1 - self.trimmed_fraction), FRACTION_DIGITS)
            model, _, _ = cs.trim_once(model, fraction, self.split, threshold=stage.apoz_threshold)
            self.trimmed_fraction = stage.target_sparsity
            report.update(fraction_of_remaining=fraction, widths=list(model.widths()),
                          accuracy_pruned=cs.accuracy_on_test(model, self.split))
            cs.train_digits(model, self.split, train_settings(stage.retrain))
            return model, report
        if stage.pruning_type == "lottery_ticket":
            return self._lottery_ticket(stage, report)
        outcome = cs.particle_filter_pruning(model, self.split, stage.granularity, stage.target_sparsity,
                                             train_settings(stage.retrain), stage.num_particles, stage.iterations,
                                             stage.stride, stage.seed)
        report.update(accuracy_pruned=outcome.accuracy_pruned, weight_sparsity=outcome.sparsity,
                      search_seconds=outcome.search_seconds, evaluations=outcome.evaluations)
        if stage.granularity != "channel":
            report["weights_remaining_in_pruned_layers"] = remaining_fraction(outcome.masks)
        return outcome.model, report

    def _lottery_ticket(self, stage, report: dict) -> tuple[torch.nn.Module, dict]:
        """The rounds (each trained from the initial weights), then the last round's ticket rebuilt: rewound and
        trained again under its mask, as in its round."""
        spec, train = self.recipe.model, self._dense_training()
        rounds = cs.lottery_tickets(spec.architecture, self.split, train_settings(self.recipe.train), stage.rounds,
                                    stage.prune_fraction, stage.rewind_to, spec.seed, stage.scope,
                                    stage.output_layer_rate, spec.widths)
        report["rounds"] = [{"round": r.round, "remaining_fraction": r.remaining_fraction,
                             "ticket_accuracy": r.ticket_accuracy, "random_accuracy": r.random_accuracy}
                            for r in rounds]
        ticket, masks = self._fresh_model(), rounds[-1].masks
        if stage.rewind_to != "init":
            # theta_k: the dense network after k steps of the same training
            k, saved = int(stage.rewind_to.split(":")[1]), {}

            def save(step):
                if step == k:
                    saved.update({key: v.detach().clone() for key, v in ticket.state_dict().items()})

            cs.train_digits(ticket, self.split, train, after_step=save)
            if not saved:
                raise ValueError(f"rewind_to {stage.rewind_to}: training has fewer than {k} steps")
            ticket.load_state_dict(saved)
        with enforce_masks(prunable_layers(ticket), masks):
            cs.train_digits(ticket, self.split, train)
        report["weights_remaining_in_pruned_layers"] = remaining_fraction(masks)
        return ticket, report

    def describe_data(self) -> dict:
        return self.split.sizes()

    def save(self, model: torch.nn.Module, directory: Path, slimmed: bool, final: Path) -> str:
        save_digits_model(model, directory)
        return LOAD_DIGITS.format(path=str(final))
