"""The structured pruning types "flap", "wanda_sp" and "structured_magnitude" through inc_plugins.prepare_pruning:
scores against brute force on synthetic tiny models, the FLOPs target, bias compensation in closed form, masked ==
slimmed logits for every supported family, save -> from_pretrained, bad input, recipes, and two ranks.

Synthetic tiny models (random weights) and synthetic token batches whose odd rows end in padding.
"""

import copy
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from neural_compressor import WeightPruningConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import inc_plugins
from inc_plugins.models.architectures import UnsupportedModelError
from inc_plugins.models.saving import save_slimmed
from inc_plugins.post_training.flops_budget import unit_costs
from inc_plugins.models.structure_masks import fold_structure_masks, mask_structure
from recipes import apply
from recipes.schema import RecipeError, parse_recipe
from tests.fixtures.calibration_data import token_batches
from tests.fixtures.tiny_models import (
    tiny_bert_classifier,
    tiny_distilbert_classifier,
    tiny_gpt2_lm,
    tiny_llama_lm,
    tiny_mistral_lm,
    tiny_mpnet_classifier,
    tiny_qwen2_lm,
    tiny_roberta_classifier,
)
from tests.test_recipe_tasks import llm_recipe, tiny_lm  # noqa: F401  (tiny_lm: the fixture)

TYPES = ("flap", "wanda_sp", "structured_magnitude")
FAMILIES = {"bert": tiny_bert_classifier, "distilbert": tiny_distilbert_classifier, "mpnet": tiny_mpnet_classifier,
            "roberta": tiny_roberta_classifier, "llama_gqa": tiny_llama_lm, "mistral_gqa": tiny_mistral_lm,
            "qwen2_gqa": tiny_qwen2_lm}


def _batches(seed=1):
    return token_batches(n_batches=3, batch_size=2, seq_len=16, seed=seed)  # odd rows end in padding


def _prune(model, pruning_type, batches=None, **settings):
    config = WeightPruningConfig(pruning_configs=[{"pruning_type": pruning_type, "target_sparsity": 0.3, **settings}])
    return inc_plugins.prepare_pruning(model, config, dataloader=_batches() if batches is None else batches)


def _inputs(batch):
    return {key: value for key, value in batch.items() if key != "labels"}


def _projection_rows(model, batches, names):
    """Brute force: {module name: [real tokens, features]} of the inputs those modules receive in full forward passes."""
    rows, current = {name: [] for name in names}, {}

    def record(name):
        def hook(_module, args):
            x = args[0]
            rows[name].append(x[current["mask"]].reshape(-1, x.shape[-1]).double())
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    with torch.no_grad():
        for batch in batches:
            current["mask"] = batch["attention_mask"].bool()
            model(**_inputs(batch))
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in rows.items()}


def _llama_projections(layer):
    return f"model.layers.{layer}.self_attn.o_proj", f"model.layers.{layer}.mlp.down_proj"


def _z(values):
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return [(v - mean) / std for v in values]


def test_flap_scores_match_brute_force_on_the_dense_model():
    """Per channel: variance over the real tokens times the column's squared norm; standardised per block and module;
    a key/value group (2 query heads x 8 features) scores the mean of its 16 channels."""
    model = tiny_llama_lm()
    dense = copy.deepcopy(model)
    result = _prune(model, "flap").result
    names = [name for layer in range(2) for name in _llama_projections(layer)]
    rows = _projection_rows(dense, _batches(), names)
    for layer in range(2):
        for name, scores, per_unit in zip(_llama_projections(layer), (result.head_scores, result.neuron_scores), (16, 1)):
            x, weight = rows[name], dense.get_submodule(name).weight.detach().double()
            raw = [float(x[:, j].var()) * sum(float(weight[i, j]) ** 2 for i in range(weight.shape[0]))
                   for j in range(x.shape[1])]
            z = _z(raw)
            expected = [sum(z[u * per_unit:(u + 1) * per_unit]) / per_unit for u in range(len(z) // per_unit)]
            assert scores[layer].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert rows[names[0]].shape[0] == sum(int(b["attention_mask"].sum()) for b in _batches())  # padding left out


def test_wanda_sp_scores_match_brute_force_block_after_pruned_block():
    """Block 0 is scored on the dense model's activations, block 1 on those of the model with block 0 pruned: the
    score of a channel is sum_i |W_ij| * ||X_j||, a group's the sum over its channels."""
    model = tiny_llama_lm()
    dense = copy.deepcopy(model)
    result = _prune(model, "wanda_sp").result
    partly = copy.deepcopy(dense)  # block 0 pruned as the result says, block 1 dense
    head_mask, neuron_mask = result.head_mask.clone(), result.neuron_mask.clone()
    head_mask[1], neuron_mask[1] = 1, 1
    fold_structure_masks(partly, head_mask, neuron_mask)
    for layer, source in ((0, dense), (1, partly)):
        rows = _projection_rows(source, _batches(), _llama_projections(layer))
        for name, scores, per_unit in zip(_llama_projections(layer), (result.head_scores, result.neuron_scores),
                                          (16, 1)):
            x, weight = rows[name], dense.get_submodule(name).weight.detach().double()
            channel = [sum(abs(float(weight[i, j])) for i in range(weight.shape[0])) * float(x[:, j].norm())
                       for j in range(x.shape[1])]
            expected = [sum(channel[u * per_unit:(u + 1) * per_unit]) for u in range(len(channel) // per_unit)]
            assert scores[layer].tolist() == pytest.approx(expected, rel=1e-5)


def test_structured_magnitude_is_data_free_with_seq_len_and_scores_column_norms():
    model = tiny_bert_classifier()
    dense = copy.deepcopy(model)
    config = WeightPruningConfig(pruning_configs=[{"pruning_type": "structured_magnitude", "target_sparsity": 0.3,
                                                   "seq_len": 12}])
    result = inc_plugins.prepare_pruning(model, config).result  # no dataloader
    assert result.seq_len == 12
    for layer in range(2):
        prefix = f"bert.encoder.layer.{layer}"
        attention = dense.get_submodule(f"{prefix}.attention.output.dense").weight.detach()
        ffn = dense.get_submodule(f"{prefix}.output.dense").weight.detach()
        norms = [float(attention[:, j].norm()) for j in range(32)]
        assert result.head_scores[layer].tolist() == pytest.approx([sum(norms[h * 8:(h + 1) * 8]) for h in range(4)],
                                                                   rel=1e-5)
        assert result.neuron_scores[layer].tolist() == pytest.approx([float(ffn[:, j].norm()) for j in range(64)],
                                                                     rel=1e-5)
    with pytest.raises(inc_plugins.PruningConfigError, match="set seq_len or pass dataloader="):
        inc_plugins.prepare_pruning(tiny_bert_classifier(), WeightPruningConfig(pruning_configs=[
            {"pruning_type": "structured_magnitude", "target_sparsity": 0.3}]))


@pytest.mark.parametrize("pruning_type", TYPES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_masked_model_equals_slimmed_model_and_meets_the_flops_target(pruning_type, family):
    model = FAMILIES[family]()
    structure = mask_structure(model)
    pruning = _prune(model, pruning_type)
    result = pruning.result
    batch = _inputs(_batches(seed=5)[0])
    with torch.no_grad():
        masked = model(**batch).logits
        slimmed = inc_plugins.slim(model, result)
        assert torch.allclose(slimmed(**batch).logits, masked, rtol=0, atol=1e-5)
    # the target, as mask_search's budget counts it: removed MACs of whole units >= target_sparsity * dense
    costs = unit_costs(structure, result.seq_len)
    unit_keep = result.head_mask.view(structure.n_layers, structure.n_head_units, -1)[..., 0] != 0
    removed = (int((~unit_keep).sum()) * costs.per_head_unit + int((result.neuron_mask == 0).sum()) * costs.per_neuron)
    assert result.removed_cost == removed >= result.target_cost == pytest.approx(0.3 * costs.dense)
    assert result.seq_len == round(sum(int(b["attention_mask"].sum()) for b in _batches()) / 6)
    assert (unit_keep.sum(dim=1) >= 1).all() and ((result.neuron_mask != 0).sum(dim=1) >= 1).all()
    if pruning_type != "flap":  # uniform: every block loses the same numbers
        assert len(set(unit_keep.sum(dim=1).tolist())) == 1 and len(set((result.neuron_mask != 0).sum(1).tolist())) == 1
    kept_query_heads = [len(heads) for heads in slimmed.config.inc_slimmed["heads"]]
    assert kept_query_heads == (result.head_mask != 0).sum(dim=1).tolist()


@pytest.mark.parametrize("build, attention, ffn", [
    (tiny_bert_classifier, "bert.encoder.layer.{}.attention.output.dense", "bert.encoder.layer.{}.output.dense"),
    (tiny_llama_lm, "model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"),
])
def test_flap_bias_compensation_keeps_each_projection_exact_on_the_calibration_mean(build, attention, ffn):
    """Closed form: each pruned output projection, on the mean of its dense calibration inputs, gives the dense
    projection's output there (the Llama projections had no bias: FLAP added one)."""
    model = build()
    dense = copy.deepcopy(model)
    result = _prune(model, "flap").result
    assert result.bias_compensated and (result.neuron_mask == 0).any() and (result.head_mask == 0).any()
    names = [pattern.format(layer) for layer in range(2) for pattern in (attention, ffn)]
    rows = _projection_rows(dense, _batches(), names)
    for name in names:
        mean = rows[name].mean(dim=0).float()
        pruned, original = model.get_submodule(name), dense.get_submodule(name)
        assert pruned.bias is not None
        assert torch.allclose(pruned(mean), original(mean), rtol=0, atol=1e-5), name
        removed = pruned.weight.abs().sum(dim=0) == 0
        if removed.any():  # (without compensation the output there would move)
            uncompensated = original(mean) - original.weight[:, removed] @ mean[removed]
            assert not torch.allclose(uncompensated, original(mean), atol=1e-5)
    uncompensated_model = build()
    _prune(uncompensated_model, "flap", bias_compensation=False)
    for name in names:  # no compensation: the biases are the dense model's (none on Llama's projections)
        bias, dense_bias = uncompensated_model.get_submodule(name).bias, dense.get_submodule(name).bias
        assert (bias is None and dense_bias is None) or torch.equal(bias, dense_bias)


def test_flap_slimmed_llama_saves_and_loads_with_plain_from_pretrained(tmp_path):
    model = tiny_llama_lm()
    result = _prune(model, "flap").result
    slimmed = inc_plugins.slim(model, result)
    save_slimmed(slimmed, tmp_path / "slim")
    assert json.loads((tmp_path / "slim" / "config.json").read_text())["inc_slimmed"]["output_biases"] == [
        "self_attn.o_proj", "mlp.down_proj"]
    # (the attention implementation the model was built with: sdpa's sums round differently from eager's)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "slim",
                                                  attn_implementation=slimmed.config._attn_implementation)
    assert type(loaded).__name__ == "IncSlimmedLlamaForCausalLM"
    assert loaded.state_dict().keys() == slimmed.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in slimmed.state_dict().items())
    ids = _batches(seed=3)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, slimmed(ids).logits)
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.bias, slimmed.model.layers[0].mlp.down_proj.bias)
    assert loaded.model.layers[0].mlp.down_proj.bias.abs().sum() > 0


@pytest.mark.parametrize("pruning_type", TYPES)
def test_bad_input_gets_one_clear_line(pruning_type):
    with pytest.raises(UnsupportedModelError, match=r"supported families: bert-like \(.*\); llama-like \(.*\)"):
        _prune(tiny_gpt2_lm(), pruning_type)
    config = WeightPruningConfig(pruning_configs=[{"pruning_type": pruning_type, "target_sparsity": 0.3,
                                                   "op_names": ["bert.encoder.layer.0"]},
                                                  {"pruning_type": pruning_type, "target_sparsity": 0.2,
                                                   "op_names": ["bert.encoder.layer.1"]}])
    with pytest.raises(inc_plugins.PruningConfigError, match="give exactly one pruning_configs entry"):
        inc_plugins.prepare_pruning(tiny_bert_classifier(), config, dataloader=_batches())
    with pytest.raises(inc_plugins.PruningConfigError, match="target_sparsity"):
        _prune(tiny_bert_classifier(), pruning_type, target_sparsity=1.0)
    with pytest.raises(ValueError, match="lower target_sparsity"):
        _prune(tiny_bert_classifier(), pruning_type, target_sparsity=0.99)
    if pruning_type != "structured_magnitude":
        with pytest.raises(inc_plugins.PruningConfigError, match="pass dataloader="):
            inc_plugins.prepare_pruning(tiny_bert_classifier(), WeightPruningConfig(
                pruning_configs=[{"pruning_type": pruning_type, "target_sparsity": 0.3}]))


# --- recipes ----------------------------------------------------------------------------------------------------


def test_a_flap_decoder_recipe_must_slim_or_skip_compensation(tiny_lm):  # noqa: F811
    recipe = llm_recipe(*tiny_lm, pruning_type="flap", target_sparsity=0.2)
    for key in ("pattern", "op_names"):
        recipe["pruning"][0].pop(key)
    with pytest.raises(RecipeError, match="set slim: true, or bias_compensation: false"):
        parse_recipe(recipe)
    parse_recipe({**recipe, "pruning": [{**recipe["pruning"][0], "bias_compensation": False}]})


@pytest.mark.parametrize("pruning_type", ["flap", "wanda_sp"])
def test_a_slimming_recipe_removes_the_target_and_saves_a_loadable_model(tmp_path, monkeypatch, tiny_lm,  # noqa: F811
                                                                         pruning_type):
    monkeypatch.chdir(tmp_path)
    recipe = llm_recipe(*tiny_lm, pruning_type=pruning_type, target_sparsity=0.2)
    for key in ("pattern", "op_names"):
        recipe["pruning"][0].pop(key)
    run_dir = apply.run(parse_recipe({**recipe, "slim": True}))
    report = json.loads((run_dir / "report.json").read_text())
    stage, macs = report["pruning_stages"][0], report["macs"]
    assert stage["structure"]["seq_len"] == macs["seq_len"] == 16 and macs["before"] == stage["structure"]["dense_cost"]
    assert macs["after"] == stage["structure"]["cost"] <= 0.8 * macs["before"]
    assert report["model"]["slimmed"] and report["model"]["slimming_check"]["max_abs_logit_difference_on_a_dev_batch"] < 1e-4
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert [len(heads) for heads in loaded.config.inc_slimmed["heads"]] == stage["structure"]["kept_heads"]
    assert "slimmed" in (run_dir / "summary.md").read_text()
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["pruning"][0]["pruning_type"] == pruning_type


# --- two ranks ---------------------------------------------------------------------------------------------------

WORLD = 2


def _rank_main(rank: int, directory: str, pruning_type: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(f"{directory}/source")
        result = _prune(model, pruning_type, batches=_batches()[rank::WORLD]).result
        save_file({"head": result.head_mask, "neuron": result.neuron_mask, "head_scores": result.head_scores,
                   "neuron_scores": result.neuron_scores, "bias": model.model.layers[0].mlp.down_proj.bias
                   if model.model.layers[0].mlp.down_proj.bias is not None else torch.zeros(1)},
                  f"{directory}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("pruning_type", ["flap", "wanda_sp"])
def test_two_ranks_remove_the_units_one_process_removes(tmp_path, pruning_type):
    """Each rank calibrates on its share of the 3 batches (2 and 1, so the ranks' token counts and lengths differ);
    the combined statistics give every rank one process's units and, to float64 rounding, its scores."""
    tiny_llama_lm(seed=9).save_pretrained(tmp_path / "source")
    mp.spawn(_rank_main, args=(str(tmp_path), pruning_type), nprocs=WORLD, join=True)
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "source")
    result = _prune(single, pruning_type).result
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(WORLD)]
    for part in ranks:
        assert torch.equal(part["head"], result.head_mask) and torch.equal(part["neuron"], result.neuron_mask)
        assert torch.allclose(part["head_scores"].double(), result.head_scores.double(), rtol=1e-6)
        assert torch.allclose(part["neuron_scores"].double(), result.neuron_scores.double(), rtol=1e-6)
    assert torch.equal(ranks[0]["bias"], ranks[1]["bias"])
