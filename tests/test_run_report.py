"""The run report's weight counts (recipes.report): exact zero counts per layer and in all, for a model in memory
and for a streamed one whose blocks are read one tensor at a time. Checked against a count in plain Python."""

import pytest
import torch

from inc_plugins.execution.streamed_model import open_streamed_causal_lm
from recipes.report import layer_sparsity, parameter_counts
from tests.fixtures.tiny_models import tiny_llama_lm


def _zeroed_llama():
    """The tiny Llama with a different number of exact zeros in each parameter."""
    model = tiny_llama_lm(seed=3)
    with torch.no_grad():
        for number, (_, parameter) in enumerate(model.named_parameters()):
            parameter.view(-1)[: number + 1] = 0.0
    return model


def _python_zeros(tensor: torch.Tensor) -> int:
    return sum(value == 0.0 for value in tensor.detach().flatten().tolist())


@pytest.mark.parametrize("streamed", [False, True], ids=["in_memory", "streamed"])
def test_counts_are_exact(tmp_path, streamed):
    model = _zeroed_llama()
    expected_sparsity = {name: _python_zeros(module.weight) / module.weight.numel()
                         for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    parameters = dict(model.named_parameters())
    expected_counts = {"total": sum(p.numel() for p in parameters.values()),
                       "nonzero": sum(p.numel() - _python_zeros(p) for p in parameters.values())}
    if streamed:
        model.save_pretrained(tmp_path / "model", max_shard_size="20KB")
        model = open_streamed_causal_lm(tmp_path / "model")
    assert layer_sparsity(model) == expected_sparsity
    assert parameter_counts(model) == expected_counts


def test_a_layer_slimming_emptied_reports_no_zeros():
    """Slimming at 70% of MiniLM's FLOPs left a block no attention head: its query/key/value Linears have no weights
    (0 x 384). The report says 0.0 for them (nothing is zero), as for every slimmed layer, instead of failing."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 0), torch.nn.Linear(8, 4))
    with torch.no_grad():
        model[1].weight[0, :2] = 0.0
    assert layer_sparsity(model) == {"0": 0.0, "1": 2 / 32}
