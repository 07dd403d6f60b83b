"""The plugins' SparseGPT: INC 3.7.1's Hessian and weights bit for bit (one layer, and whole tiny decoders through its
driver), closed forms on a diagonal Hessian, exact OWL counts, the routing of `pruning_type="sparse_gpt"` between INC's
driver and the plugins', and bad settings."""

import copy

import pytest
import torch
from neural_compressor.compression.pruner.pruners import get_pruner
from neural_compressor.compression.pruner.pruning import SparseGPTPruning
from neural_compressor.compression.pruner.utils import process_config

import inc_plugins
from inc_plugins.algorithms.input_gram import InputGram
from inc_plugins.algorithms.sparse_gpt import DAMPING, sparse_gpt_prune
from inc_plugins.inc.config import inc_defaults_restored
from inc_plugins.inc.sparse_gpt import PluginSparseGPTPruning
from inc_plugins.models.layer_views import weight_matrix
from tests.test_wanda_pruner import FIXTURES, nm_groups
from tests.fixtures.tiny_models import tiny_llama_lm, tiny_opt_lm

NM = {"1x1": None, "2:4": (2, 4), "4:8": (4, 8)}


def correlated_inputs(seed: int, features: int = 256) -> torch.Tensor:
    """Synthetic [batches, tokens, features] inputs with correlated features and one that never fires."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) * 0.1
    x = torch.randn(6, 20, features, generator=generator) @ mixing
    x[..., 5] = 0
    return x


def incs_fasterprune(weight: torch.Tensor, x: torch.Tensor, pattern: str) -> torch.Tensor:
    """INC 3.7.1's SparseGPT pruner on one Linear: its Hessian hook over the batches of x, then its fasterprune."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    with inc_defaults_restored():
        info = process_config(inc_plugins.pruning_config(pruning_type="sparse_gpt", pattern=pattern,
                                                         target_sparsity=0.5))[0]
    pruner = get_pruner(info, {"layer": layer})
    handles = pruner.register_gpt_hook(["layer"])
    with torch.no_grad():
        for batch in x:
            layer(batch[None])
    for handle in handles:
        handle.remove()
    pruner.fasterprune(["layer"])
    return layer.weight.detach()


@pytest.mark.parametrize("pattern", ["1x1", "2:4", "4:8"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_layer_gives_incs_fasterprune_weights(pattern, seed):
    x = correlated_inputs(seed)
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(seed + 10))
    theirs = incs_fasterprune(weight, x, pattern)
    target = {"nm": NM[pattern]} if NM[pattern] else {"sparsity": 0.5}
    gram, batches = InputGram(), [(batch.reshape(-1, 256), 1) for batch in x]
    gram.add(gram.batch_products(batches), batches)
    result = sparse_gpt_prune(weight, gram.matrix, **target)
    # the reference's arithmetic throughout: INC's weights bit for bit, so even exact ties of the costs agree
    assert torch.equal(result.weight, theirs) and torch.equal(result.keep, theirs != 0)
    assert torch.equal(weight, torch.randn(48, 256, generator=torch.Generator().manual_seed(seed + 10)))  # untouched
    assert (result.weight[~result.keep] == 0).all()


def test_the_input_gram_is_incs_hessian_bit_for_bit():
    from neural_compressor.compression.pruner.pruners.sparse_gpt import SparseGPTPruner

    x = correlated_inputs(3, features=64)
    incs = SparseGPTPruner.SparseGPT(torch.nn.Linear(64, 8))
    ours = InputGram()
    for batch in x.split([1, 2, 3]):  # batches of 1, 2 and 3 samples
        incs.add_batch(batch)
        batches = [(batch.reshape(-1, 64), batch.shape[0])]
        ours.add(ours.batch_products(batches), batches)
    assert torch.equal(ours.matrix, incs.H)


def test_a_diagonal_hessian_prunes_by_damped_magnitude_and_updates_nothing():
    """Orthogonal inputs: H = diag(h), so each weight's cost is w^2 (h + λ) and no pruning error reaches another
    column (closed form of the optimal brain surgeon step)."""
    generator = torch.Generator().manual_seed(0)
    h = torch.rand(16, generator=generator) + 0.1
    weight = torch.randn(5, 16, generator=generator)
    costs = weight ** 2 * (h + DAMPING * h.mean())
    for target, expected_keep in [
        ({"nm": (2, 4)}, torch.ones(5, 4, 4, dtype=torch.bool).scatter_(
            2, torch.topk(costs.reshape(5, 4, 4), 2, dim=2, largest=False).indices, False).reshape(5, 16)),
        ({"pruned_count": 37}, costs > torch.sort(costs.flatten()).values[36]),
        ({"sparsity": 0.5}, costs > torch.sort(costs.flatten()).values[40]),  # the reference's threshold: 41 pruned
    ]:
        result = sparse_gpt_prune(weight, torch.diag(h), **target)
        assert torch.equal(result.keep, expected_keep), target
        torch.testing.assert_close(result.weight, weight * expected_keep)


@pytest.mark.parametrize("count", [0, 1, 9_999, 12_345, 14_400])
def test_a_pruned_count_is_met_exactly_across_uneven_column_blocks(count):
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(400, 300, generator=generator)
    result = sparse_gpt_prune(torch.randn(48, 300, generator=generator), rows.T @ rows, pruned_count=count)
    assert int((~result.keep).sum()) == count


def test_bad_arguments_are_named():
    weight, gram = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="exactly one of"):
        sparse_gpt_prune(weight, gram, sparsity=0.5, nm=(2, 4))
    with pytest.raises(ValueError, match=r"gram has shape \[8, 8\], expected \[6, 6\]"):
        sparse_gpt_prune(torch.randn(4, 6), gram, sparsity=0.5)
    with pytest.raises(ValueError, match="not positive definite"):
        sparse_gpt_prune(weight, torch.full((8, 8), float("nan")), sparsity=0.5)


# --- through INC's config -------------------------------------------------------------------------------------


def windows(count: int = 6, length: int = 16) -> list[tuple[torch.Tensor]]:
    """Synthetic batch-1 token windows without padding, as a causal-LM recipe calibrates."""
    generator = torch.Generator().manual_seed(5)
    return [(torch.randint(1, 100, (1, length), generator=generator),) for _ in range(count)]


def sparse_gpt(model, batches, **entry):
    config = inc_plugins.pruning_config(pruning_configs=[
        {"pruning_type": "sparse_gpt", "target_sparsity": 0.5, "op_names": ["layers"], **entry}])
    return inc_plugins.prepare_pruning(model, config, dataloader=batches)


def test_incs_driver_runs_unless_the_entry_sets_a_plugin_key():
    assert isinstance(sparse_gpt(tiny_llama_lm(), windows(), pattern="1x1"), SparseGPTPruning)
    for key, value in [("layer_sparsity", "uniform"), ("owl_m", 5.0), ("owl_lambda", 0.08)]:
        assert isinstance(sparse_gpt(tiny_llama_lm(), windows(), **{key: value}), PluginSparseGPTPruning), key


@pytest.mark.parametrize("pattern", ["1x1", "2:4"])
@pytest.mark.parametrize("build", [tiny_llama_lm, tiny_opt_lm], ids=["llama", "opt"])
def test_the_plugins_sparse_gpt_gives_incs_weights_on_tiny_decoders(build, pattern):
    incs, ours = build(), build()
    sparse_gpt(incs, windows(), pattern=pattern)
    pruning = sparse_gpt(ours, windows(), pattern=pattern, layer_sparsity="uniform")
    (pruner,) = pruning.pruners
    assert len(pruner.modules) == (14 if build is tiny_llama_lm else 12)
    for name, module in pruner.modules.items():
        assert torch.equal(weight_matrix(module) != 0, pruner.masks[name]), name
        assert torch.equal(module.weight, incs.get_submodule(name).weight), name  # bit for bit, merged calls and all


def test_owl_with_sparse_gpt_spreads_block_sparsities_and_meets_the_target_exactly():
    (pruner,) = sparse_gpt(tiny_llama_lm(), windows(), layer_sparsity="owl", owl_m=2.0, owl_lambda=0.1).pruners
    total = sum(module.weight.numel() for module in pruner.modules.values())
    assert sum(int((~mask).sum()) for mask in pruner.masks.values()) == int(total * 0.5)
    realised = []
    for block in (0, 1):
        masks = [mask for name, mask in pruner.masks.items() if f"layers.{block}." in name]
        realised.append(sum(int((~m).sum()) for m in masks) / sum(m.numel() for m in masks))
    assert sorted(realised) == pytest.approx([0.4, 0.6], abs=1e-3)
    assert realised == pytest.approx([pruner.block_sparsity[0], pruner.block_sparsity[1]], abs=1e-3)


def test_conv_layers_are_pruned_in_incs_nm_order():
    build, batches, names, _ = FIXTURES["cnn"]
    names = names[1:]  # the first conv has 9 inputs
    config = inc_plugins.pruning_config(pruning_configs=[
        {"pruning_type": "sparse_gpt", "target_sparsity": 0.5, "pattern": "2:4", "layer_sparsity": "uniform",
         "excluded_op_names": ["features\\.0\\."]}])
    model = build()
    dense = copy.deepcopy(model)
    (pruner,) = inc_plugins.prepare_pruning(model, config, dataloader=batches).pruners
    assert sorted(pruner.modules) == sorted(names)
    for name, module in pruner.modules.items():
        groups = nm_groups(module, module.weight != 0).reshape(module.weight.shape[0], -1, 4)
        assert (groups.sum(dim=2) == 2).all(), name
        assert not torch.equal(module.weight[module.weight != 0], dense.get_submodule(name).weight[module.weight != 0])


@pytest.mark.parametrize("entry,message", [
    ({"layer_sparsity": "owl", "pattern": "2:4"}, r"layer_sparsity 'owl' sets each block's sparsity itself"),
    ({"layer_sparsity": "uniform", "pattern": "4x1"}, r"SparseGPT supports '1x1' \(unstructured\) and 'N:M'"),
    ({"pattern": "4x1"}, r"SparseGPT supports '1x1' \(unstructured\) and 'N:M'"),
    ({"update_weights": True}, r"pruning_type 'sparse_gpt' has no config key 'update_weights'"),
    ({"layer_sparsity": "uniform", "pattern": "2:4", "target_sparsity": 0.3}, r"set target_sparsity to 0.5"),
])
def test_settings_that_cannot_work_are_refused(entry, message):
    with pytest.raises(inc_plugins.PruningConfigError, match=message):
        sparse_gpt(tiny_llama_lm(), windows(), **entry)
