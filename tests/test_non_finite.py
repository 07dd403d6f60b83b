"""Non-finite values (NaN, Inf) stop every pruner, training loop and dense evaluation with one line that names the
layer (or batch, step, metric) where they first appear. Synthetic tiny models and data only."""

import itertools
import math
import types

import pytest
import torch

import inc_plugins
from inc_plugins.finite_checks import (NonFiniteError, check_model_and_calibration, check_tensor,
                                      first_non_finite_parameter)
from inc_plugins.inc.wanda import NonFiniteActivationError
from tests.fixtures.calibration_data import image_batches, token_batches
from tests.fixtures.tiny_models import tiny_bert_classifier, tiny_cnn, tiny_llama_lm

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = image_batches(n_batches=2, batch_size=8)
TOKENS = token_batches(n_batches=2, batch_size=2, seq_len=8)
LABELLED_TOKENS = token_batches(n_batches=2, batch_size=4, seq_len=8, labels="classification")
QUICK_PF = {"num_particles": 3, "iterations": 1}


def prune(model, batches, **entry):
    config = inc_plugins.pruning_config(pruning_configs=[entry])
    return inc_plugins.prepare_pruning(model, config, dataloader=batches)


def poison(parameter, value=float("nan"), index=0):
    with torch.no_grad():
        parameter.view(-1)[index] = value


def nan_images(batches, which=0, all_nan=True):
    """A copy of ``batches`` whose ``which``-th images are all NaN (or hold one NaN)."""
    result = [(images.clone(), labels) for images, labels in batches]
    images = result[which][0]
    if all_nan:
        images.fill_(float("nan"))
    else:
        images.view(-1)[3] = float("nan")
    return result


def overflowing_first_conv(model):
    """Finite weights and data whose first convolution overflows to +inf."""
    with torch.no_grad():
        model.features[0][0].weight.fill_(3e38)
    return model


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def unchanged(model, before):
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), before[name], rtol=0, atol=0, equal_nan=True)
    return True


# --- the error -----------------------------------------------------------------------------------------------


def test_the_error_is_a_value_error_exported_with_the_other_errors():
    assert inc_plugins.NonFiniteError is NonFiniteError
    assert issubclass(NonFiniteError, ValueError) and "NonFiniteError" in inc_plugins.__all__
    assert issubclass(NonFiniteActivationError, NonFiniteError)


def test_first_non_finite_parameter_names_it_with_its_counts():
    model = tiny_llama_lm()
    assert first_non_finite_parameter(model) is None
    poison(model.model.layers[1].mlp.down_proj.weight)
    poison(model.model.layers[1].mlp.down_proj.weight, float("inf"), 5)
    assert first_non_finite_parameter(model) == (
        "model.layers.1.mlp.down_proj.weight (holds 1 NaN and 1 Inf of 2048 values)"
    )


@pytest.mark.parametrize("make", [lambda: torch.zeros(13), lambda: torch.zeros(5, 3), lambda: torch.zeros(4, 2, 3),
                                  lambda: torch.zeros(3, 5).t(), lambda: torch.zeros(9, 1, dtype=torch.bfloat16)],
                         ids=["vector", "matrix", "3d", "transposed", "bf16"])
def test_a_tensor_checked_piece_by_piece_finds_a_nan_or_inf_at_any_position(monkeypatch, make):
    monkeypatch.setattr("inc_plugins.finite_checks._CHECK_CHUNK", 4)  # every tensor here spans several pieces
    check_tensor(make(), "layer", "weight", "a test")  # finite: no error
    for index in itertools.product(*map(range, make().shape)):
        for value in (float("nan"), float("inf"), float("-inf")):
            tensor = make()
            tensor[index] = value
            with pytest.raises(NonFiniteError, match=r"weight of layer 'layer' holds"):
                check_tensor(tensor, "layer", "weight", "a test")


# --- Wanda ---------------------------------------------------------------------------------------------------


def wanda(model, batches):
    return prune(model, batches, pruning_type="wanda", target_sparsity=0.5, pattern="1x1")


@pytest.mark.parametrize("layer", ["model.layers.1.mlp.down_proj", "model.layers.0.mlp.up_proj"])
def test_wanda_names_the_layer_holding_a_nan_weight_before_pruning_anything(layer):
    model = tiny_llama_lm()
    poison(model.get_submodule(layer).weight, index=7)
    before = snapshot(model)
    with pytest.raises(NonFiniteError) as caught:
        wanda(model, TOKENS)
    message = str(caught.value)
    assert message.startswith(f"weight of layer {layer!r} holds 1 NaN and 0 Inf of 2048 values (Wanda calibration)")
    assert "check the model file" in message
    assert (caught.value.layer, caught.value.kind, caught.value.nan, caught.value.inf) == (layer, "weight", 1, 0)
    assert "down_proj" not in message or layer.endswith("down_proj")  # not the layer that receives its output
    assert unchanged(model, before)  # no block was pruned
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_wanda_names_nan_calibration_images():
    with pytest.raises(NonFiniteError, match=r"^calibration batch 1 \(element 0\) holds 1 NaN and 0 Inf of 512 values "
                                             r"\(Wanda calibration\): check the calibration data$"):
        wanda(tiny_cnn(), nan_images(IMAGES, which=1, all_nan=False))


def test_wanda_names_the_block_whose_output_overflows():
    with pytest.raises(NonFiniteError, match=r"^output activation of layer 'features\.0' holds \d+ NaN and \d+ Inf "
                                             r".*\(Wanda calibration, block 0, batch 0\)"):
        wanda(overflowing_first_conv(tiny_cnn()), IMAGES)


# --- mask_search (Kwon et al.) -------------------------------------------------------------------------------


def mask_search(model, batches, **entry):
    return prune(model, batches, pruning_type="mask_search", target_sparsity=0.3, **entry)


def test_mask_search_names_the_layer_holding_a_nan_weight():
    model = tiny_bert_classifier()
    poison(model.bert.encoder.layer[1].output.dense.weight)
    with pytest.raises(NonFiniteError, match=r"^weight of layer 'bert\.encoder\.layer\.1\.output\.dense' holds 1 NaN "
                                             r"and 0 Inf of 2048 values \(mask_search\)"):
        mask_search(model, LABELLED_TOKENS)


def test_mask_search_names_nan_calibration_embeddings():
    model = tiny_bert_classifier()
    with torch.no_grad():
        embeds = [model.bert.embeddings.word_embeddings(batch["input_ids"]) for batch in LABELLED_TOKENS]
    embeds[0][1, 2, 3] = float("inf")
    batches = [{"inputs_embeds": e, "attention_mask": b["attention_mask"], "labels": b["labels"]}
               for e, b in zip(embeds, LABELLED_TOKENS)]
    with pytest.raises(NonFiniteError, match=r"^calibration batch 0 \(key 'inputs_embeds'\) holds 0 NaN and 1 Inf "
                                             r".*\(mask_search\): check the calibration data$"):
        mask_search(model, batches)


def test_mask_search_names_a_nan_loss():
    def nan_loss(outputs, batch):
        return outputs.logits.sum() * float("nan")

    with pytest.raises(NonFiniteError, match=r"^the loss holds 1 NaN and 0 Inf of 1 values "
                                             r"\(mask_search Fisher gradients, batch 0\)"):
        inc_plugins.prepare_pruning(
            tiny_bert_classifier(),
            inc_plugins.pruning_config(pruning_configs=[{"pruning_type": "mask_search", "target_sparsity": 0.3}]),
            dataloader=LABELLED_TOKENS, loss_func=nan_loss,
        )


def test_mask_search_names_the_block_of_a_nan_mask_gradient():
    def zero_loss_with_nan_gradient(outputs, batch):  # d sqrt(v)/dv at v = 0 is inf; inf * 0 = NaN
        logits = outputs.logits
        return torch.sqrt((logits - logits.detach()).pow(2).sum())

    with pytest.raises(NonFiniteError, match=r"^attention-unit mask gradient of layer 'bert\.encoder\.layer\.0' holds "
                                             r"4 NaN .*\(mask_search Fisher gradients, batch 0\)"):
        inc_plugins.prepare_pruning(
            tiny_bert_classifier(),
            inc_plugins.pruning_config(pruning_configs=[{"pruning_type": "mask_search", "target_sparsity": 0.3}]),
            dataloader=LABELLED_TOKENS, loss_func=zero_loss_with_nan_gradient,
        )


# --- network trimming and the apoz criterion -----------------------------------------------------------------


def trimming(model, batches):
    return prune(model, batches, pruning_type="network_trimming", target_sparsity=0.5, pattern="1xchannel",
                 pruning_scope="local")


def test_network_trimming_names_the_layer_holding_a_nan_weight():
    model = tiny_cnn()
    poison(model.features[1][0].weight, index=11)
    with pytest.raises(NonFiniteError, match=r"^weight of layer 'features\.1\.0' holds 1 NaN and 0 Inf of 1152 values "
                                             r"\(network_trimming\)"):
        trimming(model, IMAGES)


def test_network_trimming_refuses_all_nan_calibration_data():
    model = tiny_cnn()
    before = snapshot(model)
    with pytest.raises(NonFiniteError, match=r"^calibration batch 0 \(element 0\) holds 512 NaN and 0 Inf of 512 "
                                             r"values \(network_trimming\): check the calibration data$"):
        trimming(model, [(torch.full_like(images, float("nan")), labels) for images, labels in IMAGES])
    assert unchanged(model, before)


def test_network_trimming_names_the_layer_whose_activation_overflows():
    with pytest.raises(NonFiniteError, match=r"^output activation of layer 'features\.0\.0' holds .* "
                                             r"\(APoZ read at 'features\.0\.2'\)"):
        trimming(overflowing_first_conv(tiny_cnn()), IMAGES)


def test_apoz_criterion_stops_training_on_nan_activations():
    model = tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    config = inc_plugins.pruning_config(pruning_configs=[{
        "pruning_type": "apoz", "target_sparsity": 0.5, "pattern": "1xchannel", "start_step": 1, "end_step": 2,
        "pruning_scope": "local", "pruning_op_types": ["Conv"]}])
    pruning = inc_plugins.prepare_pruning(model, config, optimizer=optimizer)
    pruning.on_train_begin()
    images, labels = nan_images(IMAGES)[0]
    with pytest.raises(NonFiniteError, match=r"^output activation of layer 'features\.0\.0' holds 4096 NaN and 0 Inf of "
                                             r"4096 values \(APoZ read at 'features\.0\.2'\)"):
        model(images)
    pruning.pruners[0].criterion.remove_hooks()


# --- particle filter -----------------------------------------------------------------------------------------


def particle_filter(model, batches):
    return prune(model, batches, pruning_type="particle_filter", target_sparsity=0.5, pattern="1xchannel",
                 pruning_op_types=["Conv"], **QUICK_PF)


def test_particle_filter_names_the_layer_holding_a_nan_weight():
    model = tiny_cnn()
    poison(model.features[2][0].weight, float("-inf"))
    with pytest.raises(NonFiniteError, match=r"^weight of layer 'features\.2\.0' holds 0 NaN and 1 Inf of 4608 values "
                                             r"\(particle filter\)"):
        particle_filter(model, IMAGES)


def test_particle_filter_names_a_nan_batch_norm_statistic():
    model = tiny_cnn()
    poison(model.features[1][1].running_var)
    with pytest.raises(NonFiniteError, match=r"^BatchNorm running_var of layer 'features\.1\.1' holds 1 NaN"):
        particle_filter(model, IMAGES)


def test_particle_filter_refuses_all_nan_calibration_data():
    model = tiny_cnn()
    before = snapshot(model)
    with pytest.raises(NonFiniteError, match=r"^calibration batch 1 \(element 0\) holds 512 NaN and 0 Inf of 512 "
                                             r"values \(particle filter\): check the calibration data$"):
        particle_filter(model, nan_images(IMAGES, which=1))
    assert unchanged(model, before)


def test_particle_filter_names_overflowing_logits():
    with pytest.raises(NonFiniteError, match=r"^the model's output \(logits\) holds \d+ NaN and \d+ Inf of 80 values "
                                             r"\(misclassification rate on batch 0\)"):
        particle_filter(overflowing_first_conv(tiny_cnn()), IMAGES)


# --- network slimming ----------------------------------------------------------------------------------------


def slimming(model):
    return prune(model, IMAGES, pruning_type="network_slimming", target_sparsity=0.5, pattern="1xchannel",
                 pruning_op_types=["Conv"])


def test_network_slimming_names_a_nan_batch_norm_scale():
    model = tiny_cnn()
    poison(model.features[1][1].weight, index=4)
    with pytest.raises(NonFiniteError, match=r"^BatchNorm scale \(gamma\) of layer 'features\.1\.1' holds 1 NaN and "
                                             r"0 Inf of 16 values \(network_slimming\)"):
        slimming(model)


def test_network_slimming_names_a_nan_weight_it_does_not_rank_by():
    model = tiny_cnn()
    poison(model.classifier.weight)
    with pytest.raises(NonFiniteError, match=r"^weight of layer 'classifier' holds 1 NaN .*\(network_slimming\)"):
        slimming(model)


# --- sparse_gpt: the check for the entry point ---------------------------------------------------------------


def test_model_and_calibration_check_for_sparse_gpt():
    model = tiny_llama_lm()
    check_model_and_calibration(model, TOKENS, "sparse_gpt")  # finite: nothing
    poison(model.model.layers[1].self_attn.v_proj.weight)
    with pytest.raises(NonFiniteError, match=r"^weight of layer 'model\.layers\.1\.self_attn\.v_proj' .*\(sparse_gpt\)"):
        check_model_and_calibration(model, TOKENS, "sparse_gpt")
    with pytest.raises(NonFiniteError, match=r"^calibration batch 1 \(element 0\) holds 512 NaN"):
        check_model_and_calibration(tiny_cnn(), nan_images(IMAGES, which=1), "sparse_gpt")
    one_shot = iter(nan_images(IMAGES))
    check_model_and_calibration(tiny_cnn(), one_shot, "sparse_gpt")  # a one-shot iterator is not read
    assert len(list(one_shot)) == 2


# --- recipes: dense evaluation and training ------------------------------------------------------------------


def test_dense_perplexity_nan_stops_naming_the_first_non_finite_weight():
    from recipes.tasks import CausalLMTask

    task = CausalLMTask(types.SimpleNamespace(evaluation=types.SimpleNamespace(batch_size=2)))
    task.evaluation_windows = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model = tiny_llama_lm()
    assert math.isfinite(task.evaluate(model, desc="evaluate dense")["perplexity"])
    poison(model.model.layers[0].mlp.down_proj.weight)
    with pytest.raises(NonFiniteError, match=r"^the dense model's perplexity is nan: a weight or the evaluation data "
                                             r"holds NaN/Inf; first non-finite weight: "
                                             r"model\.layers\.0\.mlp\.down_proj\.weight \(holds 1 NaN"):
        task.evaluate(model, desc="evaluate dense")


def test_dense_classification_logits_nan_stop_the_evaluation():
    from recipes.text_classification import evaluate

    model = tiny_bert_classifier()
    poison(model.classifier.weight)
    with pytest.raises(NonFiniteError, match=r"^the dense model's logits hold 4 NaN and 0 Inf of 8 values on evaluation "
                                             r"batch 0: .*first non-finite weight: classifier\.weight"):
        evaluate(model, LABELLED_TOKENS, desc="evaluate dense")


def test_text_fine_tune_stops_at_the_step_whose_loss_is_nan():
    from recipes.text_classification import train

    model = tiny_bert_classifier()

    def break_a_weight(step):
        if step == 1:  # 0-based: after the second optimizer step
            poison(model.bert.encoder.layer[0].intermediate.dense.weight)

    with pytest.raises(NonFiniteError, match=r"^fine-tune stopped at step 3: the loss is nan; first non-finite weight: "
                                             r"bert\.encoder\.layer\.0\.intermediate\.dense\.weight"):
        train(model, LABELLED_TOKENS, 5, 1e-3, desc="fine-tune", after_step=break_a_weight)


def test_text_fine_tune_checks_the_weights_of_its_last_step():
    from recipes.text_classification import train

    model = tiny_bert_classifier()
    with pytest.raises(NonFiniteError, match=r"^fine-tune stopped after step 1: the weights hold NaN/Inf; "
                                             r"first non-finite weight: classifier\.bias"):
        train(model, LABELLED_TOKENS, 1, 1e-3, desc="fine-tune",
              after_step=lambda step: poison(model.classifier.bias))


def synthetic_digits():
    from recipes.digits import DigitsSplit

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(96, 1, 8, 8, generator=generator)
    labels = torch.arange(96) % 10
    return DigitsSplit(images[:64], labels[:64], images[64:80], labels[64:80], images[80:], labels[80:], seed=0)


def test_digits_training_with_infinite_weight_decay_stops_naming_the_step():
    from recipes.classic_stages import TrainSettings, train_digits
    from recipes.vision_models import build_digits_model

    model = build_digits_model("digits_mlp", [16, 8])
    settings = TrainSettings(epochs=2, batch_size=32, weight_decay=float("inf"))
    with pytest.raises(NonFiniteError, match=r"^training \(epoch 1 of 2\) stopped at step 2: the loss is nan; "
                                             r"first non-finite weight: 1\.weight"):
        train_digits(model, synthetic_digits(), settings)


def test_digits_accuracy_of_a_nan_model_stops():
    from recipes.classic_stages import accuracy_on_test
    from recipes.vision_models import build_digits_model

    model = build_digits_model("digits_cnn", [4, 4, 4])
    split = synthetic_digits()
    assert 0 <= accuracy_on_test(model, split) <= 1
    poison(model.classifier.bias)
    with pytest.raises(NonFiniteError, match=r"^the model's logits hold 16 NaN .*first non-finite weight: "
                                             r"classifier\.bias"):
        accuracy_on_test(model, split)
