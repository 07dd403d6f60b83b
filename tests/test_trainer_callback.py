"""INC's training-aware pruning driven by a Hugging Face Trainer through ``inc_plugins.PruningCallback``: the
sparsity schedule counts optimizer steps (not micro-batches, not evaluation passes), the target is reached, INC's
hooks are gone afterwards, and one-shot types are refused. Tiny synthetic BERT and token batches."""

import warnings

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import inc_plugins
from tests.fixtures.calibration_data import token_batches
from tests.fixtures.tiny_models import tiny_bert_classifier

PRUNED_LAYERS = ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.intermediate.dense"]


def examples(n_batches=4):
    """The synthetic batches as a list of single examples (what a Trainer's dataset yields)."""
    rows = []
    for batch in token_batches(n_batches, 4, 12, labels="classification"):
        rows += [{key: value[row] for key, value in batch.items()} for row in range(batch["input_ids"].shape[0])]
    return rows


def zeros_of(model):
    """Fraction of zeros in the pruned layers' weights."""
    weights = [model.get_submodule(name).weight for name in PRUNED_LAYERS]
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


class RecordSparsity(TrainerCallback):
    """The pruned layers' share of zeros after every optimizer step, and after every evaluation."""

    def __init__(self):
        self.after_step, self.after_evaluation = [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step.append(zeros_of(model))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.after_evaluation.append(zeros_of(model))


def train(tmp_path, config, steps=8, accumulation=1, evaluate_every=None):
    model = tiny_bert_classifier()
    data = examples()
    callback, record = inc_plugins.PruningCallback(config), RecordSparsity()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-3, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
                             eval_strategy="steps" if evaluate_every else "no", eval_steps=evaluate_every,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4] if evaluate_every else None,
                      callbacks=[callback, record])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "optimizer.step()` has been overridden" in str(w.message)]
    return model, trainer, callback, record


def magnitude(end_step=6, frequency=2):
    return inc_plugins.pruning_config(pruning_type="magnitude", target_sparsity=0.5, pattern="4x1",
                                      op_names=PRUNED_LAYERS, start_step=0, end_step=end_step,
                                      pruning_frequency=frequency)


@pytest.mark.parametrize("accumulation,evaluate_every", [(1, None), (2, 1)])
def test_the_schedule_counts_optimizer_steps_and_reaches_the_target(tmp_path, accumulation, evaluate_every):
    # two micro-batches per step, and an evaluation after every step, must not change the schedule
    model, trainer, callback, record = train(tmp_path, magnitude(), accumulation=accumulation,
                                             evaluate_every=evaluate_every)
    sparsity = record.after_step
    assert len(sparsity) == 8
    # INC prunes at steps 2, 4 and 6 (counted from 0: every pruning_frequency steps up to end_step), and only there
    changed = [step for step in range(1, 8) if sparsity[step] != sparsity[step - 1]]
    assert changed == [2, 4, 6] and sparsity[0] == 0
    assert sparsity[2] < sparsity[4] < sparsity[6] == pytest.approx(0.5, abs=0.01)  # ramps up to the target
    assert zeros_of(model) == pytest.approx(0.5, abs=0.01)  # and holds it through the last step
    if evaluate_every:  # an evaluation sees the model as trained so far: it prunes nothing ahead of the next step
        assert record.after_evaluation == sparsity
    assert sorted(callback.pruning.pruners[0].modules) == PRUNED_LAYERS  # INC's pruner, kept on the callback


def test_inc_hooks_are_detached_after_training(tmp_path):
    model, trainer, callback, _ = train(tmp_path, magnitude())
    assert "inc_hook_handle" not in model.__dict__ and "prunings" not in model.__dict__
    assert not model._forward_pre_hooks  # nothing left that advances a schedule on a forward pass
    assert "orig_step" not in trainer.optimizer.__dict__
    assert torch.save.__module__ == "torch.serialization"  # INC's process-wide torch.save replacement undone
    before = zeros_of(model)
    with torch.no_grad():
        model(**{k: v.unsqueeze(0) for k, v in examples()[0].items() if k != "labels"})
    assert zeros_of(model) == before


def test_a_plugin_criterion_prunes_inside_the_trainer(tmp_path):
    config = inc_plugins.pruning_config(pruning_type="wanda_score", target_sparsity=0.5, pattern="4x1",
                                        op_names=PRUNED_LAYERS, start_step=0, end_step=4, pruning_frequency=2)
    model, *_ = train(tmp_path, config, steps=6)
    assert zeros_of(model) == pytest.approx(0.5, abs=0.01)


def test_lottery_tickets_prune_and_rewind_inside_the_trainer(tmp_path):
    """INC's schedule prunes at steps 4 and 6 (its first pruning step, 2, prunes nothing); the weights the kept ones
    return to are the initial ones (rewind_step 0)."""
    config = inc_plugins.pruning_config(pruning_type="lottery_ticket", target_sparsity=0.5, pattern="1x1",
                                        op_names=PRUNED_LAYERS, start_step=2, end_step=6, pruning_frequency=2)
    initial = {name: weight.detach().clone() for name, weight in tiny_bert_classifier().named_parameters()}
    model, _, callback, record = train(tmp_path, config)
    (pruner,) = callback.pruning.pruners
    assert pruner.rounds == 2 and record.after_step[6] == pytest.approx(0.5, abs=0.01)
    assert all(torch.equal(pruner.rewind_weights[name], initial[f"{name}.weight"]) for name in PRUNED_LAYERS)


def test_one_shot_types_are_refused_with_the_way_to_run_them():
    config = inc_plugins.pruning_config(pruning_type="wanda", target_sparsity=0.5)
    with pytest.raises(inc_plugins.PruningConfigError, match=r"\['wanda'\] prune one-shot .* dataloader=") as error:
        inc_plugins.PruningCallback(config)
    assert "before training" in str(error.value)
    with pytest.raises(inc_plugins.PruningConfigError, match="WeightPruningConfig"):
        inc_plugins.PruningCallback({"pruning_type": "magnitude"})
