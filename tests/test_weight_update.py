"""The least-squares weight update after a fixed mask (inc_plugins.algorithms.weight_update) and Wanda's
update_weights option: the refit against torch.linalg.lstsq, pruned positions staying zero, the output error it
removes, and the registered type's refit of real (synthetic) model layers against the same closed form."""

import pytest
import torch

from inc_plugins.algorithms.input_gram import InputGram, symmetric_product
from inc_plugins.algorithms.weight_update import DAMPING, refit_kept_weights
from inc_plugins.inc.wanda import WandaPruner, _SharedInputGram
from inc_plugins.models.layer_views import input_rows, weight_matrix
from tests.test_wanda_pruner import FIXTURES, wanda


def _problem(seed: int, rows: int = 6, inputs: int = 10, tokens: int = 40, sparsity: float = 0.5):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inputs, generator=generator) @ torch.randn(inputs, inputs, generator=generator)
    weight = torch.randn(rows, inputs, generator=generator)
    keep = torch.rand(rows, inputs, generator=generator).argsort(dim=1) >= int(inputs * sparsity)
    return x.double(), weight.double(), keep


def _lstsq_refit(x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, damping: float = DAMPING):
    """Each row's minimiser of ||X (w - v)||^2 + lambda ||w - v||^2 over v zero outside its kept inputs, by
    torch.linalg.lstsq on the stacked system [X_K; sqrt(lambda) I] v_K = [X w; sqrt(lambda) w_K]."""
    lam = damping * (x * x).sum(dim=0).mean()
    refit = torch.zeros_like(weight)
    for r in range(weight.shape[0]):
        kept = keep[r].nonzero()[:, 0]
        system = torch.cat([x[:, kept], lam.sqrt() * torch.eye(kept.numel(), dtype=x.dtype)])
        target = torch.cat([x @ weight[r], lam.sqrt() * weight[r, kept]])
        refit[r, kept] = torch.linalg.lstsq(system, target[:, None]).solution[:, 0]
    return refit


def _output_error(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor) -> float:
    return float(((x @ (weight - other).T) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_refit_is_the_least_squares_solution_and_keeps_pruned_weights_zero(seed, sparsity):
    x, weight, keep = _problem(seed, sparsity=sparsity)
    refit = refit_kept_weights(weight.float(), keep, (x.T @ x).float(), tolerance=1e-9, max_iterations=100)
    expected = _lstsq_refit(x, weight, keep)
    torch.testing.assert_close(refit.weight.double(), expected, rtol=1e-3, atol=1e-4)
    assert torch.all(refit.weight[~keep] == 0)
    assert refit.refit_error < refit.masked_error


def test_default_tolerance_removes_nearly_all_the_error_the_exact_refit_removes():
    x, weight, keep = _problem(4, rows=32, inputs=48, tokens=200)
    refit = refit_kept_weights(weight.float(), keep, (x.T @ x).float())
    exact, masked = _lstsq_refit(x, weight, keep), weight * keep
    gap = _output_error(x, weight, refit.weight.double()) - _output_error(x, weight, exact)
    assert gap <= 0.01 * (_output_error(x, weight, masked) - _output_error(x, weight, exact))


def test_a_full_mask_leaves_the_weight_alone():
    x, weight, _ = _problem(5)
    keep = torch.ones_like(weight, dtype=torch.bool)
    refit = refit_kept_weights(weight.float(), keep, (x.T @ x).float())
    torch.testing.assert_close(refit.weight, weight.float())
    assert refit.masked_error == 0


def test_a_feature_that_never_fires_gets_its_weights_pruned_without_nan():
    x, weight, keep = _problem(6)
    x[:, 3] = 0  # a dead input: X^T X is singular, damping keeps every row's system definite
    refit = refit_kept_weights(weight.float(), keep, (x.T @ x).float(), tolerance=1e-9, max_iterations=100)
    assert torch.isfinite(refit.weight).all()
    torch.testing.assert_close(refit.weight.double(), _lstsq_refit(x, weight, keep), rtol=1e-3, atol=1e-4)


def test_gram_is_two_over_n_times_the_sum_of_every_batchs_product():
    generator = torch.Generator().manual_seed(7)
    first, second = torch.randn(5, 4, generator=generator), torch.randn(3, 4, generator=generator)
    gram = InputGram()
    for rows, samples in [(first, 2), (second, 1)]:
        gram.add(gram.batch_products([(rows, samples)]), [(rows, samples)])
    torch.testing.assert_close(gram.matrix, 2 / 3 * (first.T @ first + second.T @ second))
    assert (gram.num_tokens, gram.num_samples) == (8, 3)
    wrong = [(torch.randn(2, 5), 1)]
    with pytest.raises(ValueError, match="features"):
        gram.add(InputGram().batch_products(wrong), wrong)


@pytest.mark.parametrize("features", [1, 3, 7, 64])
def test_symmetric_product_is_x_times_its_transpose(features):
    x = torch.randn(features, 33, generator=torch.Generator().manual_seed(features))
    product = symmetric_product(x)  # 4 panels: fewer features than panels leaves some empty
    torch.testing.assert_close(product, x @ x.T)
    gram, batches = InputGram(), [(x.T, 3)]
    torch.testing.assert_close(gram.batch_products(batches, symmetric=True)[0], gram.batch_products(batches)[0])


def test_refit_rejects_mismatched_shapes_and_non_bool_masks():
    weight, gram = torch.randn(3, 4), torch.eye(4)
    with pytest.raises(ValueError, match=r"gram \[in, in\]"):
        refit_kept_weights(weight, torch.ones(3, 4, dtype=torch.bool), torch.eye(5))
    with pytest.raises(TypeError, match="bool"):
        refit_kept_weights(weight, torch.ones(3, 4), gram)


def _first_block_inputs(model, batches, names):
    """Each layer's input rows from dense forward passes: what Wanda's block walk shows the first block."""
    rows = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: rows[name].append(input_rows(module, args[0]).detach().double()))
        for name in names]
    with torch.no_grad():
        for batch in batches:
            if isinstance(batch, dict):
                model(**{key: value for key, value in batch.items() if key != "labels"})
            else:
                model(batch[0])  # (images, labels)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in rows.items()}


@pytest.mark.parametrize(("family", "pattern"), [(family, pattern) for family in ("llama", "opt", "gpt2", "bert")
                                                  for pattern in ("1x1", "2:4")] + [("cnn", "1x1")])
def test_registered_type_refits_each_layer_of_the_first_block_to_its_least_squares_weights(family, pattern):
    build, batches, names, _ = FIXTURES[family]
    first_block = [name for name in names if ".0." in name]
    dense = build()
    inputs = _first_block_inputs(dense, batches, first_block)
    masked, updated = build(), build()
    wanda(masked, batches, pattern=pattern)
    wanda(updated, batches, pattern=pattern, update_weights=True)
    for name in first_block:
        weight = weight_matrix(dense.get_submodule(name)).double()
        ours = weight_matrix(updated.get_submodule(name)).double()
        keep = weight_matrix(masked.get_submodule(name)) != 0
        assert torch.all(ours[~keep] == 0), name  # Wanda's mask, untouched by the update
        x = inputs[name]
        exact = _lstsq_refit(x, weight, keep)
        optimum, mask_alone = _output_error(x, weight, exact), _output_error(x, weight, weight * keep)
        assert _output_error(x, weight, ours) - optimum <= 0.01 * (mask_alone - optimum), name
    later = [name for name in names if ".0." not in name]
    assert any(not torch.equal(weight_matrix(masked.get_submodule(n)) != 0, weight_matrix(updated.get_submodule(n)) != 0)
               for n in later)  # later blocks calibrate on the updated blocks' outputs, as SparseGPT's walk does


@pytest.mark.parametrize("entry", [{}, {"layer_sparsity": "owl"}, {"comparison_group": "global"}])
def test_each_layer_refits_on_the_sequential_pass_tokens_only(monkeypatch, entry):
    """OWL and a global ranking run a dense pass first: it must not add its inputs to the refit's X^T X."""
    build, batches, names, _ = FIXTURES["llama"]
    tokens = {}
    original = WandaPruner._refit

    def recording(self, name, keep):
        tokens[name] = self.input_grams[name].num_tokens
        original(self, name, keep)

    monkeypatch.setattr(WandaPruner, "_refit", recording)
    wanda(build(), batches, update_weights=True, **entry)
    expected = sum(batch["input_ids"].numel() for batch in batches)
    assert tokens == {name: expected for name in names}


def test_layers_share_the_products_only_while_their_input_and_state_are_unchanged():
    shared, x, linear = _SharedInputGram(), torch.randn(4, 6), torch.nn.Linear(6, 6)
    batches = [(x, 1)]
    gram, other = InputGram(), InputGram()
    first = shared.batch_products(linear, x, gram, batches)
    assert shared.batch_products(linear, x, other, batches) is first  # the same tensor and state: the same products
    other.add(first, batches)
    torch.testing.assert_close(shared.batch_products(linear, x, other, batches)[0], x.T @ x)  # other state: rescaled
    x.mul_(2.0)
    torch.testing.assert_close(shared.batch_products(linear, x, gram, batches)[0], 2 * x.T @ x)
