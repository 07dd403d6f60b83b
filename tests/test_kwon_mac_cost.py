"""MAC cost formulas of heads and FFN neurons (Kwon et al. 2022, section 3.1)."""

import pytest
import torch

from inc_plugins.algorithms.mac_cost import head_macs, layer_macs, model_macs, neuron_macs


def test_bert_base_layer_matches_hand_count():
    # BERT-base, 128 tokens: projections 4*L*d^2, attention 2*L^2*d, FFN 2*L*d*d_ff.
    L, d, heads, d_ff = 128, 768, 12, 3072
    expected = 4 * L * d * d + 2 * L * L * d + 2 * L * d * d_ff
    assert layer_macs([heads], [d_ff], L, d, d // heads) == [expected]
    assert heads * head_macs(L, d, d // heads) + d_ff * neuron_macs(L, d) == expected
    # 12 layers ~ 11.2 GMACs ~ 22 GFLOPs, the figure usually quoted for BERT-base at 128 tokens.
    assert 12 * expected == pytest.approx(11.17e9, rel=1e-3)


def test_head_and_neuron_formulas():
    assert head_macs(4, 6, 2) == 4 * 4 * 6 * 2 + 2 * 4 * 4 * 2
    assert neuron_macs(4, 6) == 2 * 4 * 6


def test_layer_macs_is_linear_in_kept_counts():
    per_layer = layer_macs([0, 3, 1], [5, 0, 2], 7, 10, 5)
    assert per_layer == [5 * neuron_macs(7, 10), 3 * head_macs(7, 10, 5), head_macs(7, 10, 5) + 2 * neuron_macs(7, 10)]


def test_model_macs_counts_masks():
    head_mask = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    neuron_mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    assert model_macs(head_mask, neuron_mask, 4, 6, 2) == 2 * head_macs(4, 6, 2) + 3 * neuron_macs(4, 6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: head_macs(0, 6, 2), "seq_len must be a positive int"),
        (lambda: neuron_macs(4, 6.0), "hidden_size must be a positive int"),
        (lambda: layer_macs([1, 2], [1], 4, 6, 2), "kept_heads has 2 layers but kept_neurons has 1"),
        (lambda: layer_macs([1], [-1], 4, 6, 2), "layer 0: kept counts must be >= 0"),
        (lambda: model_macs(torch.ones(2, 3), torch.ones(3, 4), 4, 6, 2), "same n_layers"),
    ],
)
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()
