"""Kwon et al. (2022) end to end: structure masks, Fisher gradients, FLOPs/latency budgets, mask tuning, INC's
"mask_search" pruning type, and the errors people get for bad inputs."""

import copy
import warnings

import pytest
import torch
from neural_compressor.compression.pruner.utils import get_sparsity_ratio

import inc_plugins
from inc_plugins import latency_table
from inc_plugins.algorithms.mac_cost import model_macs
from inc_plugins.algorithms.mask_tuning import normal_equations
from inc_plugins.inc.mask_search import MaskSearchResult
from inc_plugins.models.architectures import UnsupportedModelError
from inc_plugins.models.structure_masks import apply_structure_masks, fold_structure_masks, mask_structure
from inc_plugins.post_training import (
    KwonSettings,
    LatencyTable,
    LatencyTableMismatchError,
    collect_mask_gradients,
    current_machine,
    prune_post_training,
    tune_mask_scales,
    unit_normal_equations,
)
from tests.fixtures.calibration_data import token_batches
from tests.fixtures.tiny_models import tiny_bert_classifier, tiny_gpt2_lm, tiny_llama_lm

HIDDEN, HEAD_DIM, N_HEADS, N_NEURONS, N_LAYERS = 32, 8, 4, 64, 2


def bert_batches(n=3, seed=0):
    return token_batches(n, 4, 12, seed=seed, labels="classification")


def llama_batches(n=3, seed=0):
    return token_batches(n, 4, 12, seed=seed, labels="lm")


def logits(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def mask_search_config(**entry):
    return inc_plugins.pruning_config(pruning_configs=[{"pruning_type": "mask_search", **entry}])


def average_length(batches):
    mask = torch.cat([b["attention_mask"] for b in batches])
    return round(mask.sum().item() / mask.shape[0])


# --- masks applied with hooks --------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_bert_classifier, tiny_llama_lm])
def test_all_ones_masks_leave_the_model_unchanged(build):
    model, batch = build(), token_batches(1, 4, 12)[0]
    structure = mask_structure(model)
    dense = logits(model, batch)
    ones_heads = torch.ones(structure.n_layers, structure.n_head_units)
    with apply_structure_masks(model, ones_heads, torch.ones(structure.n_layers, structure.n_neurons)):
        masked = logits(model, batch)
    torch.testing.assert_close(masked, dense, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, batch), dense, rtol=0, atol=0)  # hooks are gone


def test_zero_head_or_neuron_mask_equals_zeroing_output_projection_columns():
    model, batch = tiny_bert_classifier(), token_batches(1, 4, 12)[0]
    head_mask, neuron_mask = torch.ones(N_LAYERS, N_HEADS), torch.ones(N_LAYERS, N_NEURONS)
    head_mask[0, 1] = 0
    neuron_mask[1, 5] = 0
    with apply_structure_masks(model, head_mask, neuron_mask):
        hooked = logits(model, batch)

    manual = copy.deepcopy(model)
    with torch.no_grad():
        manual.bert.encoder.layer[0].attention.output.dense.weight[:, HEAD_DIM : 2 * HEAD_DIM] = 0
        manual.bert.encoder.layer[1].output.dense.weight[:, 5] = 0
    torch.testing.assert_close(hooked, logits(manual, batch))
    assert not torch.allclose(hooked, logits(model, batch))


def test_llama_group_mask_is_shared_by_the_group_query_heads():
    model, batch = tiny_llama_lm(), token_batches(1, 4, 12)[0]
    group_mask = torch.ones(N_LAYERS, 2)  # 4 query heads share 2 key/value heads
    group_mask[1, 1] = 0
    with apply_structure_masks(model, group_mask):
        hooked = logits(model, batch)
    manual = copy.deepcopy(model)
    with torch.no_grad():
        manual.model.layers[1].self_attn.o_proj.weight[:, 2 * HEAD_DIM :] = 0  # query heads 2 and 3
    torch.testing.assert_close(hooked, logits(manual, batch))


@pytest.mark.parametrize("build", [tiny_bert_classifier, tiny_llama_lm])
def test_folding_scaled_masks_into_weights_matches_the_hooked_model(build):
    model, batch = build(), token_batches(1, 4, 12)[0]
    structure = mask_structure(model)
    generator = torch.Generator().manual_seed(0)
    units = torch.rand(structure.n_layers, structure.n_head_units, generator=generator) + 0.5
    units[0, 0] = 0
    neurons = torch.rand(structure.n_layers, structure.n_neurons, generator=generator) + 0.5
    neurons[:, ::3] = 0
    with apply_structure_masks(model, units, neurons):
        hooked = logits(model, batch)
    folded = copy.deepcopy(model)
    fold_structure_masks(folded, units, neurons)
    torch.testing.assert_close(logits(folded, batch), hooked, rtol=1e-5, atol=1e-5)


def tiny_encoder(kind):
    """Synthetic DistilBERT / MPNet / RoBERTa classifiers of the tiny BERT's sizes (their layouts differ)."""
    from transformers import (
        DistilBertConfig, DistilBertForSequenceClassification, MPNetConfig, MPNetForSequenceClassification,
        RobertaConfig, RobertaForSequenceClassification,
    )

    sizes = dict(vocab_size=128, max_position_embeddings=64, pad_token_id=0)
    if kind == "distilbert":
        config = DistilBertConfig(dim=HIDDEN, n_layers=N_LAYERS, n_heads=N_HEADS, hidden_dim=N_NEURONS, **sizes)
        build = DistilBertForSequenceClassification
    else:
        config_class, build = {
            "mpnet": (MPNetConfig, MPNetForSequenceClassification),
            "roberta": (RobertaConfig, RobertaForSequenceClassification),
        }[kind]
        config = config_class(hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                              intermediate_size=N_NEURONS, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build(config).eval()


@pytest.mark.parametrize("kind", ["distilbert", "mpnet", "roberta"])
def test_other_bert_like_layouts_mask_and_fold(kind):
    model, batch = tiny_encoder(kind), token_batches(1, 4, 12)[0]
    structure = mask_structure(model)
    assert (structure.n_heads, structure.n_neurons, structure.head_dim) == (N_HEADS, N_NEURONS, HEAD_DIM)
    head_mask, neuron_mask = torch.ones(N_LAYERS, N_HEADS), torch.full((N_LAYERS, N_NEURONS), 1.5)
    head_mask[1, 2], neuron_mask[0, :10] = 0, 0
    with apply_structure_masks(model, head_mask, neuron_mask):
        hooked = logits(model, batch)
    assert not torch.allclose(hooked, logits(model, batch))
    folded = copy.deepcopy(model)
    fold_structure_masks(folded, head_mask, neuron_mask)
    torch.testing.assert_close(logits(folded, batch), hooked, rtol=1e-5, atol=1e-5)


# --- Fisher gradients ----------------------------------------------------------------------------------------


def test_mask_gradients_match_finite_differences():
    model = tiny_bert_classifier().double()
    batch = bert_batches(1)[0]
    grads = collect_mask_gradients(model, [batch])
    assert grads.head.shape == (1, N_LAYERS, N_HEADS) and grads.neuron.shape == (1, N_LAYERS, N_NEURONS)

    def loss_at(head_mask, neuron_mask):
        with apply_structure_masks(model, head_mask, neuron_mask), torch.no_grad():
            return model(**batch).loss.item()

    eps = 1e-5
    for kind, (layer, unit) in (("head", (1, 2)), ("head", (0, 0)), ("neuron", (0, 7))):
        heads, neurons = torch.ones(N_LAYERS, N_HEADS, dtype=torch.float64), torch.ones(N_LAYERS, N_NEURONS, dtype=torch.float64)
        target = heads if kind == "head" else neurons
        target[layer, unit] = 1 + eps
        up = loss_at(heads, neurons)
        target[layer, unit] = 1 - eps
        down = loss_at(heads, neurons)
        recorded = (grads.head if kind == "head" else grads.neuron)[0, layer, unit].item()
        assert recorded == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-8)


def test_per_sample_gradients_average_to_the_batch_gradient():
    model, batches = tiny_bert_classifier().double(), bert_batches(1)
    per_batch = collect_mask_gradients(model, batches)
    per_sample = collect_mask_gradients(model, batches, per_sample=True)
    assert per_sample.head.shape[0] == 4 and per_sample.per_sample
    # the classification loss is a batch mean, so its gradient is the mean of the per-sequence gradients
    torch.testing.assert_close(per_sample.head.mean(0), per_batch.head[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(per_sample.neuron.mean(0), per_batch.neuron[0], rtol=1e-4, atol=1e-6)


# --- search under a FLOPs budget -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_searched_masks_fit_the_flops_budget(target):
    model, batches = tiny_bert_classifier(), bert_batches()
    result = prune_post_training(model, batches, KwonSettings(target, tune=False))
    seq_len = average_length(batches)
    assert result.seq_len == seq_len
    dense = model_macs(torch.ones(N_LAYERS, N_HEADS), torch.ones(N_LAYERS, N_NEURONS), seq_len, HIDDEN, HEAD_DIM)
    kept = model_macs(result.head_mask, result.neuron_mask, seq_len, HIDDEN, HEAD_DIM)
    assert kept <= (1 - target) * dense
    assert kept == result.cost and result.dense_cost == dense
    # the search spends the budget: one more neuron (2 * L * d MACs) would not fit
    assert kept > (1 - target) * dense - 2 * seq_len * HIDDEN or bool((result.neuron_mask != 0).all())




def test_precomputed_gradients_give_the_same_masks_as_computing_them():
    model, batches = tiny_llama_lm(), llama_batches()
    shared = collect_mask_gradients(model, batches)
    for target in (0.3, 0.6):
        settings = KwonSettings(target)
        fresh, reused = prune_post_training(model, batches, settings), prune_post_training(model, batches, settings, gradients=shared)
        assert torch.equal(fresh.head_mask, reused.head_mask) and torch.equal(fresh.neuron_mask, reused.neuron_mask)


def test_precomputed_gradients_of_another_model_are_refused():
    bert_gradients = collect_mask_gradients(tiny_bert_classifier(), bert_batches())
    with pytest.raises(ValueError, match=r"head gradients must be \[n_vectors, 2, 2\]"):
        prune_post_training(tiny_llama_lm(), llama_batches(), KwonSettings(0.3), gradients=bert_gradients)
# --- mask tuning ---------------------------------------------------------------------------------------------


def test_neuron_normal_equations_equal_the_explicit_contributions():
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    weight = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    target, kept = torch.randn(7, 3, generator=generator, dtype=torch.float64), torch.tensor([0, 2, 4])
    explicit = torch.stack([torch.outer(activations[:, n], weight[:, n]).flatten() for n in kept])
    gram, rhs = unit_normal_equations(activations, weight, kept, target)
    expected_gram, expected_rhs = normal_equations(explicit, target.flatten())
    torch.testing.assert_close(gram, expected_gram)
    torch.testing.assert_close(rhs, expected_rhs)


def test_head_unit_normal_equations_equal_the_explicit_contributions_in_float64_and_float32():
    generator = torch.Generator().manual_seed(1)
    context = torch.randn(9, 4 * 3, generator=generator, dtype=torch.float64)  # 4 units of width 3
    weight = torch.randn(5, 4 * 3, generator=generator, dtype=torch.float64)
    target, kept = torch.randn(9, 5, generator=generator, dtype=torch.float64), torch.tensor([0, 2, 3])
    explicit = torch.stack([(context[:, 3 * u : 3 * u + 3] @ weight[:, 3 * u : 3 * u + 3].T).flatten() for u in kept])
    expected_gram, expected_rhs = normal_equations(explicit, target.flatten())
    gram, rhs = unit_normal_equations(context, weight, kept, target, unit_width=3)
    torch.testing.assert_close(gram, expected_gram)
    torch.testing.assert_close(rhs, expected_rhs)
    # float32 activations: float32 products, float64 results, within float32 rounding
    gram32, rhs32 = unit_normal_equations(context.float(), weight.float(), kept, target.float(), unit_width=3)
    assert gram32.dtype == rhs32.dtype == torch.float64
    torch.testing.assert_close(gram32, expected_gram, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rhs32, expected_rhs, rtol=1e-5, atol=1e-4)


def known_scale_masks(structure, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keep_heads = torch.ones(structure.n_layers, structure.n_head_units)
    keep_heads[0, 1] = keep_heads[1, 0] = 0
    keep_neurons = (torch.rand(structure.n_layers, structure.n_neurons, generator=generator) > 0.4).float()
    head_scales = keep_heads * (0.5 + torch.rand(keep_heads.shape, generator=generator))
    neuron_scales = keep_neurons * (0.5 + torch.rand(keep_neurons.shape, generator=generator))
    return keep_heads, keep_neurons, head_scales, neuron_scales


@pytest.mark.parametrize("build,labels", [(tiny_bert_classifier, "classification"), (tiny_llama_lm, "lm")])
def test_tuning_recovers_known_scales(build, labels):
    """The teacher is the model under the kept units scaled by known factors: the student (the same kept units at
    scale 1) fits it exactly, block after block, only with those factors."""
    model, batches = build().double(), token_batches(3, 4, 12, labels=labels)
    structure = mask_structure(model)
    keep_heads, keep_neurons, head_scales, neuron_scales = known_scale_masks(structure)
    result = tune_mask_scales(
        model, keep_heads, keep_neurons, batches,
        teacher_head_mask=head_scales, teacher_neuron_mask=neuron_scales, damp=0.0,
        first_token_only_last_ffn=False,
    )
    assert not result.rejected and len(result.log) == 4
    torch.testing.assert_close(result.unit_head_mask, head_scales.float(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(result.neuron_mask, neuron_scales.float(), rtol=1e-3, atol=1e-3)


def test_tuning_recovers_known_scales_around_fully_pruned_llama_sublayers():
    """A block without FFN neurons (its student output then needs a full pass) and one without attention units."""
    model, batches = tiny_llama_lm().double(), token_batches(3, 4, 12, labels="lm")
    structure = mask_structure(model)
    keep_heads, keep_neurons, head_scales, neuron_scales = known_scale_masks(structure)
    keep_neurons[0], neuron_scales[0] = 0, 0
    keep_heads[1], head_scales[1] = 0, 0
    result = tune_mask_scales(model, keep_heads, keep_neurons, batches, teacher_head_mask=head_scales,
                              teacher_neuron_mask=neuron_scales, damp=0.0)
    assert not result.rejected and [(e.layer, e.part) for e in result.log] == [(0, "attention"), (1, "ffn")]
    torch.testing.assert_close(result.unit_head_mask, head_scales.float(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(result.neuron_mask, neuron_scales.float(), rtol=1e-3, atol=1e-3)


def test_a_rejected_fit_keeps_scales_of_one_for_its_sublayer_and_tuning_goes_on():
    """Block 0's attention must be scaled by 3 to match the teacher, beyond max_abs_scale 2.5: it keeps scales of
    1, and the later sub-layers are still fitted (the reference stops at the first rejection and leaves them all
    untuned). Block 1's attention, fitted on what the untuned block 0 produces, is tuned."""
    model, batches = tiny_bert_classifier().double(), token_batches(3, 4, 12, labels="classification")
    structure = mask_structure(model)
    keep_heads, keep_neurons, head_scales, neuron_scales = known_scale_masks(structure)
    head_scales[0] = keep_heads[0] * 3.0
    result = tune_mask_scales(model, keep_heads, keep_neurons, batches, teacher_head_mask=head_scales,
                              teacher_neuron_mask=neuron_scales, damp=0.0, max_abs_scale=2.5)
    assert [(e.layer, e.part) for e in result.log] == [(0, "attention"), (0, "ffn"), (1, "attention"), (1, "ffn")]
    assert not result.log[0].accepted and result.log[0].reason == "scales out of range: max |scale| 3 > 2.5"
    torch.testing.assert_close(result.unit_head_mask[0], keep_heads[0])
    assert result.log[2].accepted
    kept = keep_heads[1] != 0
    assert not torch.allclose(result.unit_head_mask[1][kept], keep_heads[1][kept])
    # 12 samples: sample 7 is held out, and the kept fit lowered the error there
    assert result.heldout_samples == 1 and result.log[2].heldout_error_tuned < result.log[2].heldout_error_untuned


def test_every_eighth_sample_judges_the_fits_and_fewer_than_eight_samples_hold_none_out():
    model = tiny_bert_classifier().double()
    structure = mask_structure(model)
    keep_heads, keep_neurons, _, _ = known_scale_masks(structure)
    many = tune_mask_scales(model, keep_heads, keep_neurons, token_batches(4, 5, 12, labels="classification"))
    assert many.heldout_samples == 2  # samples 7 and 15 of 20
    assert all(entry.heldout_error_untuned is not None for entry in many.log)
    few = tune_mask_scales(model, keep_heads, keep_neurons, token_batches(1, 7, 12, labels="classification"))
    assert few.heldout_samples == 0 and all(entry.heldout_error_untuned is None for entry in few.log)


# --- INC: pruning_type "mask_search" -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_bert():
    model, batches = tiny_bert_classifier(), bert_batches()
    original = copy.deepcopy(model)
    pruning = inc_plugins.prepare_pruning(model, mask_search_config(target_sparsity=0.4), dataloader=batches)
    return original, model, pruning, batches


def test_mask_search_through_inc_respects_the_budget_and_leaves_the_model_masked(pruned_bert):
    original, model, pruning, batches = pruned_bert
    stored = pruning.result
    assert isinstance(stored, MaskSearchResult) and not hasattr(model, "inc_structure_masks")  # returned, not stashed
    seq_len = average_length(batches)
    dense = model_macs(torch.ones(N_LAYERS, N_HEADS), torch.ones(N_LAYERS, N_NEURONS), seq_len, HIDDEN, HEAD_DIM)
    assert model_macs(stored.head_mask, stored.neuron_mask, seq_len, HIDDEN, HEAD_DIM) <= 0.6 * dense
    assert (stored.head_mask == 0).any() and (stored.neuron_mask == 0).any()
    assert pruning.result.tuning is not None and len(pruning.result.tuning.log) == 2 * N_LAYERS

    # the folded model computes what the original computes under the tuned masks, with no hooks left
    with apply_structure_masks(original, stored.head_mask, stored.neuron_mask):
        expected = logits(original, batches[0])
    torch.testing.assert_close(logits(model, batches[0]), expected, rtol=1e-5, atol=1e-5)
    layer = model.bert.encoder.layer[0]
    for head in (stored.head_mask[0] == 0).nonzero().flatten().tolist():
        columns = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
        assert not layer.attention.output.dense.weight[:, columns].any()
        assert not layer.attention.self.query.weight[columns].any()
        assert not layer.attention.self.value.weight[columns].any()


def test_inc_sparsity_report_counts_the_zeroed_weights(pruned_bert):
    _, model, pruning, _ = pruned_bert
    assert sorted(p.config["pattern"] for p in pruning.pruners) == ["1xchannel", "channelx1"]
    assert all(type(p.pattern).__name__ == "PytorchPatternNxM" for p in pruning.pruners)
    elementwise, over_all, blockwise = get_sparsity_ratio(pruning.pruners, model)
    assert (elementwise, over_all, blockwise) == pruning.report
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    total = sum(m.weight.numel() for m in linears)
    assert elementwise == pytest.approx(zeros / total)
    assert blockwise == pytest.approx(zeros / total, abs=1e-3)  # whole rows/columns: blocks == elements
    pruning.on_train_end()  # INC's report at the end of training does not crash either


def test_mask_search_keys_given_globally_reach_the_pruning():
    config = inc_plugins.pruning_config(
        pruning_configs=[{"pruning_type": "mask_search"}], target_sparsity=0.5, tune=False, seq_len=40
    )
    pruning = inc_plugins.prepare_pruning(tiny_bert_classifier(), config, dataloader=bert_batches(1))
    assert pruning.settings[0].tune is False and pruning.result.tuning is None
    assert pruning.result.seq_len == 40 and pruning.result.cost <= 0.5 * pruning.result.dense_cost


def test_mask_search_on_llama_prunes_whole_key_value_groups():
    model, batches = tiny_llama_lm(), llama_batches()
    pruning = inc_plugins.prepare_pruning(model, mask_search_config(target_sparsity=0.75), dataloader=batches)
    head_mask = pruning.result.head_mask
    assert head_mask.shape == (N_LAYERS, N_HEADS)
    groups = head_mask.reshape(N_LAYERS, 2, 2)  # [layer, key/value group, query head in group]
    assert torch.equal(groups[..., 0], groups[..., 1])
    assert (groups == 0).any(), "a 75% FLOPs cut should prune some key/value groups"
    for layer, group in (groups[..., 0] == 0).nonzero().tolist():
        attention = model.model.layers[layer].self_attn
        rows = slice(group * HEAD_DIM, (group + 1) * HEAD_DIM)
        assert not attention.k_proj.weight[rows].any() and not attention.v_proj.weight[rows].any()
        assert not attention.q_proj.weight[2 * group * HEAD_DIM : 2 * (group + 1) * HEAD_DIM].any()
    assert pruning.result.cost <= pruning.result.budget
    assert len(pruning.report) == 3


def test_mask_search_under_a_latency_table():
    model, batches = tiny_bert_classifier(), bert_batches(2)
    table = LatencyTable(
        head_latency=torch.tensor([0.0, 2.0, 2.5, 3.0, 3.5]),  # flat cost of the first head, then linear
        neuron_latency=torch.linspace(0, 6.4, N_NEURONS + 1),
        machine=current_machine("eager"),
    )
    pruning = inc_plugins.prepare_pruning(
        model,
        mask_search_config(target_sparsity=0.5, constraint="latency", latency_table=table, tune=False),
        dataloader=batches,
    )
    kept_heads = (pruning.result.head_mask != 0).sum(1)
    kept_neurons = (pruning.result.neuron_mask != 0).sum(1)
    latency = float(table.head_latency[kept_heads].sum() + table.neuron_latency[kept_neurons].sum())
    assert latency <= 0.5 * N_LAYERS * (3.5 + 6.4) + 1e-9
    assert latency == pytest.approx(pruning.result.cost)


def test_mask_search_on_llama_reads_a_saved_per_query_head_latency_table_per_group(tmp_path):
    model, batches = tiny_llama_lm(), llama_batches(2)
    saved = latency_table.save_latency_table(
        latency_table.LatencyTable(
            head_latency=[1.0, 1.5, 2.0, 2.5, 3.0],  # per query head; groups of 2 are read at 0, 2 and 4 heads
            neuron_latency=[0.05 * n for n in range(N_NEURONS + 1)],
            machine=latency_table.current_machine("eager"),
            model=latency_table.describe_model(model),
        ),
        tmp_path / "table.json",
    )
    pruning = inc_plugins.prepare_pruning(
        model,
        mask_search_config(target_sparsity=0.3, constraint="latency", latency_table=str(saved), tune=False),
        dataloader=batches,
    )
    groups = (pruning.result.head_mask != 0).reshape(N_LAYERS, 2, 2)
    assert torch.equal(groups[..., 0], groups[..., 1])
    per_group = torch.tensor([1.0, 2.0, 3.0])
    latency = per_group[groups[..., 0].sum(1)].sum() + 0.05 * (pruning.result.neuron_mask != 0).sum()
    assert float(latency) <= 0.7 * N_LAYERS * (3.0 + 0.05 * N_NEURONS) + 1e-9
    assert float(latency) == pytest.approx(pruning.result.cost)


def test_slim_returns_a_smaller_model_with_the_same_outputs(pruned_bert):
    _, model, pruning, batches = pruned_bert
    pruned = copy.deepcopy(model)
    slimmed = inc_plugins.slim(pruned, pruning.result)
    torch.testing.assert_close(logits(slimmed, batches[0]), logits(model, batches[0]), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in slimmed.parameters()) < sum(p.numel() for p in model.parameters())


# --- bad inputs ----------------------------------------------------------------------------------------------


def test_batches_without_labels_are_refused():
    with pytest.raises(ValueError, match="no 'labels'.*loss_func"):
        inc_plugins.prepare_pruning(
            tiny_bert_classifier(), mask_search_config(target_sparsity=0.4), dataloader=token_batches(1, 2, 8)
        )


def test_a_model_family_without_masks_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="bert-like.*llama-like"):
        inc_plugins.prepare_pruning(
            tiny_gpt2_lm(), mask_search_config(target_sparsity=0.4), dataloader=token_batches(1, 2, 8, labels="lm")
        )


def test_unreachable_targets_are_refused():
    with pytest.raises(ValueError, match="cannot be met"):
        KwonSettings(1.0)
    with pytest.raises(inc_plugins.PruningConfigError, match="target_sparsity"):
        inc_plugins.prepare_pruning(tiny_bert_classifier(), mask_search_config(target_sparsity=1.0), dataloader=bert_batches(1))
    # with every head and neuron pruned a block still costs the tables' entries at 0 units: here all of it
    table = {"head_latency": [1.0] * (N_HEADS + 1), "neuron_latency": [1.0] * (N_NEURONS + 1),
             "machine": current_machine("eager")}
    with pytest.raises(ValueError, match="cannot be met.*at most 0.000"):
        prune_post_training(
            tiny_bert_classifier(), bert_batches(1), KwonSettings(0.6, constraint="latency", latency_table=table)
        )


def test_a_constraint_typo_suggests_the_valid_name():
    with pytest.raises(inc_plugins.PruningConfigError, match="'latncy'.*Did you mean 'latency'"):
        inc_plugins.prepare_pruning(
            tiny_bert_classifier(), mask_search_config(target_sparsity=0.4, constraint="latncy"), dataloader=bert_batches(1)
        )


def test_a_latency_table_from_another_machine_is_refused_unless_allowed():
    machine = {**current_machine("eager"), "cpu_model": "Some Other CPU @ 1.00GHz"}
    table = {"head_latency": torch.linspace(0, 4, N_HEADS + 1), "neuron_latency": torch.linspace(0, 6, N_NEURONS + 1),
             "machine": machine}
    settings = dict(constraint="latency", latency_table=table, tune=False, rearrange=False)
    with pytest.raises(LatencyTableMismatchError, match="cpu_model: table 'Some Other CPU"):
        prune_post_training(tiny_bert_classifier(), bert_batches(1), KwonSettings(0.3, **settings))
    with pytest.raises(LatencyTableMismatchError, match="backend"):
        prune_post_training(
            tiny_bert_classifier(), bert_batches(1),
            KwonSettings(0.3, **{**settings, "latency_table": {**table, "machine": current_machine("openvino")}}),
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune_post_training(
            tiny_bert_classifier(), bert_batches(1), KwonSettings(0.3, allow_foreign_latency_table=True, **settings)
        )
    assert any("measured elsewhere" in str(w.message) for w in caught)


def test_a_latency_table_for_another_architecture_is_refused():
    table = {"head_latency": torch.linspace(0, 4, N_HEADS + 1), "neuron_latency": torch.linspace(0, 6, N_NEURONS + 1),
             "machine": current_machine("eager"), "model": {"hidden_size": 384}}
    with pytest.raises(ValueError, match="measured for hidden_size=384, this model has 32"):
        prune_post_training(tiny_bert_classifier(), bert_batches(1), KwonSettings(0.3, constraint="latency", latency_table=table))
    wrong_size = {**table, "model": {}, "neuron_latency": torch.linspace(0, 6, 2 * N_NEURONS + 1)}
    with pytest.raises(ValueError, match=rf"129 neuron entries; this model needs 5 \(0..4 heads\) and {N_NEURONS + 1}"):
        prune_post_training(tiny_bert_classifier(), bert_batches(1), KwonSettings(0.3, constraint="latency", latency_table=wrong_size))
