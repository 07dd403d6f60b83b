"""mask_search's ``bias_compensation``: FLAP's compensation of the removed heads and neurons, measured on the model
under its final masks (tuned scales included), block after compensated block.

Closed form against brute force: full forward passes of the masked model with the compensated biases give each
output projection's mean input; on that mean the pruned projection gives what the unpruned one (the tuned scales on
its kept channels, the removed channels at 1) gives. Then masked == slimmed logits, save -> from_pretrained, the
default (off), and the recipe check. Synthetic tiny models (random weights), batches whose odd rows end in padding.
"""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import inc_plugins
from inc_plugins.models.saving import save_slimmed
from inc_plugins.models.structure_masks import apply_structure_masks, expand_head_mask, mask_structure
from inc_plugins.post_training import KwonSettings, fold_kwon_result, prune_post_training
from recipes.schema import RecipeError, parse_recipe
from tests.fixtures.calibration_data import token_batches
from tests.fixtures.tiny_models import tiny_bert_classifier, tiny_llama_lm
from tests.test_recipe_tasks import llm_recipe, tiny_lm  # noqa: F401  (tiny_lm: the fixture)



def _llama_of_unit_activations():
    """The tiny Llama with its blocks' Linear weights x10: its initialisation (std 0.02) leaves activations and
    shifts near float32 rounding; here they are of order one, and the search removes a key/value group."""
    model = tiny_llama_lm()
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(10)
    return model


MODELS = {"bert": (tiny_bert_classifier, "classification", "bert.encoder.layer.{}.attention.output.dense",
                   "bert.encoder.layer.{}.output.dense"),
          "llama": (_llama_of_unit_activations, "lm", "model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj")}


def _batches(labels, seed=0):
    return token_batches(4, 4, 12, seed=seed, labels=labels)


def _inputs(batch):
    return {key: value for key, value in batch.items() if key != "labels"}


def _settings(**keys):
    return KwonSettings(0.4, check_steps=False, bias_compensation=True, **keys)


@torch.no_grad()
def _brute_force_means(model, result, batches, names):
    """{name: [features]}: the mean over real tokens of what each projection receives before the mask hook, in full
    forward passes of the dense model under the result's masks with the result's shifts in its biases."""
    compensated = copy.deepcopy(model)
    structure = mask_structure(compensated)
    for layer, (attention, ffn) in enumerate(names):
        for name, shift in ((attention, result.bias_shifts.attention[layer]), (ffn, result.bias_shifts.ffn[layer])):
            projection = compensated.get_submodule(name)
            if projection.bias is None:
                projection.bias = torch.nn.Parameter(torch.zeros(projection.out_features))
            projection.bias += shift
    rows, current = {name: [] for pair in names for name in pair}, {}

    def record(name):
        def hook(_module, args):
            rows[name].append(args[0][current["mask"]].double())
        return hook

    handles = [compensated.get_submodule(name).register_forward_pre_hook(record(name)) for name in rows]
    with apply_structure_masks(compensated, expand_head_mask(result.unit_head_mask, structure), result.neuron_mask):
        for batch in batches:  # (these hooks were registered first, so they run before the mask hooks)
            current["mask"] = batch["attention_mask"].bool()
            compensated(**_inputs(batch))
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts).mean(dim=0).float() for name, parts in rows.items()}


@pytest.mark.parametrize("tune", [False, True], ids=["search", "tuned"])
@pytest.mark.parametrize("family", list(MODELS))
def test_each_pruned_projection_is_exact_on_the_mean_of_the_compensated_masked_model(family, tune):
    build, labels, attention, ffn = MODELS[family]
    model, batches = build(), _batches(labels)
    result = prune_post_training(model, batches, _settings(tune=tune, rearrange=tune))
    if tune:
        assert result.tuning is not None and any(entry.accepted for entry in result.tuning.log)
    dense = copy.deepcopy(model)
    pruned = copy.deepcopy(model)
    fold_kwon_result(pruned, result)
    structure = mask_structure(model)
    names = [(attention.format(layer), ffn.format(layer)) for layer in range(structure.n_layers)]
    means = _brute_force_means(dense, result, batches, names)
    head_scales = expand_head_mask(result.unit_head_mask, structure).repeat_interleave(structure.head_dim, dim=1)
    removed_any = 0
    for layer, pair in enumerate(names):
        for name, scales in zip(pair, (head_scales[layer], result.neuron_mask[layer])):
            removed = scales == 0
            removed_any += int(removed.sum())
            unpruned_scales = torch.where(removed, torch.ones_like(scales), scales)
            mean = means[name]
            with torch.no_grad():
                expected = dense.get_submodule(name)(mean * unpruned_scales)
                got = pruned.get_submodule(name)(mean)
                assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (name, (got - expected).abs().max())
                if removed.any():  # the shift is what moves it there
                    without = expected - dense.get_submodule(name).weight[:, removed] @ mean[removed]
                    assert not torch.allclose(without, expected, atol=1e-3)
    assert removed_any > 0 and (result.unit_head_mask == 0).any()


@pytest.mark.parametrize("family", list(MODELS))
def test_mask_search_with_compensation_slims_to_the_same_logits_and_saves(family, tmp_path):
    build, labels, _, _ = MODELS[family]
    model, batches = build(), _batches(labels)
    pruning = inc_plugins.prepare_pruning(model, inc_plugins.pruning_config(pruning_configs=[{
        "pruning_type": "mask_search", "target_sparsity": 0.4, "bias_compensation": True}]), dataloader=batches)
    result = pruning.result
    assert result.bias_shifts is not None and result.bias_shifts.ffn.abs().sum() > 0
    probe = _inputs(_batches(labels, seed=5)[0])
    with torch.no_grad():
        masked = model(**probe).logits
        slimmed = inc_plugins.slim(model, result)
        assert torch.allclose(slimmed(**probe).logits, masked, rtol=0, atol=1e-5)
    save_slimmed(slimmed, tmp_path / "slim")
    auto = AutoModelForCausalLM if family == "llama" else AutoModelForSequenceClassification
    loaded = auto.from_pretrained(tmp_path / "slim", attn_implementation=slimmed.config._attn_implementation)
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in slimmed.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(**probe).logits, slimmed(**probe).logits)
    if family == "llama":  # biases the dense config cannot describe: the slimmed config names them
        config = json.loads((tmp_path / "slim" / "config.json").read_text())
        assert config["inc_slimmed"]["output_biases"] == ["self_attn.o_proj", "mlp.down_proj"]


def test_compensation_is_off_by_default_and_changes_only_the_output_biases():
    batches = _batches("lm")
    plain, compensated = tiny_llama_lm(), tiny_llama_lm()
    first = prune_post_training(plain, batches, KwonSettings(0.4, check_steps=False))
    second = prune_post_training(compensated, batches, _settings())
    assert first.bias_shifts is None and torch.equal(first.head_mask, second.head_mask)
    assert torch.equal(first.neuron_mask, second.neuron_mask)
    fold_kwon_result(plain, first)
    fold_kwon_result(compensated, second)
    assert plain.model.layers[0].mlp.down_proj.bias is None
    compensated_state = compensated.state_dict()
    assert {name for name in compensated_state if name not in plain.state_dict()} == {
        f"model.layers.{layer}.{name}.bias" for layer in range(2) for name in ("self_attn.o_proj", "mlp.down_proj")}
    assert all(torch.equal(tensor, compensated_state[name]) for name, tensor in plain.state_dict().items())


def test_a_compensating_mask_search_recipe_must_slim(tiny_lm):  # noqa: F811
    recipe = llm_recipe(*tiny_lm, pruning_type="mask_search", target_sparsity=0.2)
    for key in ("pattern", "op_names"):
        recipe["pruning"][0].pop(key, None)
    parse_recipe(recipe)  # off by default
    with pytest.raises(RecipeError, match=r"stage 0 \(mask_search\).*set slim: true, or bias_compensation: false"):
        parse_recipe({**recipe, "pruning": [{**recipe["pruning"][0], "bias_compensation": True}]})
    parse_recipe({**recipe, "slim": True, "pruning": [{**recipe["pruning"][0], "bias_compensation": True}]})
