"""Network slimming: the BN L1 penalty, global channel selection, masking vs physical removal, the one-shot
`network_slimming` type and the `bn_l1` INC regularizer."""

import copy

import pytest
import torch
from neural_compressor.compression.pruner.pruners.base import PRUNERS
from neural_compressor.compression.pruner.regs import REGS
from torch import nn

import inc_plugins
from inc_plugins.algorithms.bn_slimming import add_bn_l1_subgradient_, bn_l1_penalty, select_bn_channels
from inc_plugins.inc.network_slimming import BNL1Regularizer, NetworkSlimmingPruner, NetworkSlimmingPruning
from inc_plugins.models.cnn_structure import batchnorm_layers, conv_bn_pairs
from inc_plugins.models.surgery_cnn import UnsupportedCNNError, mask_bn_channels, parameter_count, slim_cnn_channels
from tests.fixtures.calibration_data import image_batches
from tests.fixtures.tiny_models import tiny_cnn

IMAGES = image_batches(n_batches=2, batch_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**entry):
    return inc_plugins.pruning_config(pruning_configs=[entry])


def two_bn_net(gammas_a, gammas_b):
    net = nn.Sequential(
        nn.Conv2d(1, len(gammas_a), 3, padding=1), nn.BatchNorm2d(len(gammas_a)), nn.ReLU(),
        nn.Conv2d(len(gammas_a), len(gammas_b), 3, padding=1), nn.BatchNorm2d(len(gammas_b)), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(len(gammas_b), 3),
    )
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor(gammas_a))
        net[4].weight.copy_(torch.tensor(gammas_b))
    return net


# --- (a) the penalty -----------------------------------------------------------------------------------------


def test_l1_penalty_value_and_gradient():
    net = two_bn_net([0.5, -2.0, 0.0], [1.5, -0.25])
    lam = 1e-2
    penalty = bn_l1_penalty(batchnorm_layers(net), lam)
    assert torch.isclose(penalty, torch.tensor(lam * (0.5 + 2.0 + 0.0 + 1.5 + 0.25)))
    penalty.backward()
    assert torch.equal(net[1].weight.grad, lam * torch.tensor([1.0, -1.0, 0.0]))  # sign(0) = 0
    assert torch.equal(net[4].weight.grad, lam * torch.tensor([1.0, -1.0]))
    assert net[0].weight.grad is None  # only the BN scales are penalised

    other = two_bn_net([0.5, -2.0, 0.0], [1.5, -0.25])
    add_bn_l1_subgradient_(batchnorm_layers(other).values(), lam)
    assert torch.equal(other[1].weight.grad, net[1].weight.grad)
    assert torch.equal(other[4].weight.grad, net[4].weight.grad)


def test_penalty_needs_batchnorm():
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn_l1_penalty(batchnorm_layers(nn.Sequential(nn.Linear(2, 2))), 1e-4)


def test_penalty_and_selection_take_batchnorm_layers_not_a_model():
    net = two_bn_net([0.5, -2.0], [1.5])
    for call in (lambda: bn_l1_penalty(net, 1e-4), lambda: add_bn_l1_subgradient_(net, 1e-4),
                 lambda: select_bn_channels(net, 0.4)):
        with pytest.raises(TypeError, match="batchnorm_layers"):
            call()


# --- (b) selection -------------------------------------------------------------------------------------------


def test_global_selection_picks_the_smallest_gamma_across_layers():
    net = two_bn_net([0.1, -5.0, 6.0], [0.2, -0.05, 7.0, 8.0])
    keep = select_bn_channels(batchnorm_layers(net), 3 / 7)  # int(3/7 * 7) = 3 channels: |gamma| 0.05, 0.1, 0.2
    assert keep["1"].tolist() == [False, True, True]
    assert keep["4"].tolist() == [False, False, True, True]


def test_global_selection_keeps_one_channel_per_layer():
    net = two_bn_net([0.01, 0.02], [5.0, 6.0, 7.0])
    # 2 channels: both of the first layer are smallest, but one must stay
    keep = select_bn_channels(batchnorm_layers(net), 0.4)
    assert keep["1"].tolist() == [False, True]
    assert keep["4"].tolist() == [False, True, True]
    with pytest.raises(ValueError, match="every channel of some layer"):
        select_bn_channels(batchnorm_layers(net), 0.8)  # 4 of 5 would leave a layer empty
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        select_bn_channels(batchnorm_layers(net), 1.0)


# --- (c, d) masking and physical removal ---------------------------------------------------------------------


def test_conv_bn_pairs_of_tiny_cnn():
    assert conv_bn_pairs(tiny_cnn()) == {f"features.{i}.0": f"features.{i}.1" for i in range(3)}


@pytest.mark.parametrize("build", [tiny_cnn, lambda: two_bn_net([0.3, 1.0, 0.2, 0.9], [0.5, 0.1, 2.0]).eval()])
def test_slimmed_cnn_equals_the_masked_cnn(build):
    model = build()
    for module in model.modules():  # non-trivial running statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(generator=torch.Generator().manual_seed(1))
    keep = select_bn_channels(batchnorm_layers(model), 0.4)
    slimmed = slim_cnn_channels(model, keep)
    masked = copy.deepcopy(model)
    mask_bn_channels(masked, keep)
    images = IMAGES[0][0]
    with torch.no_grad():
        assert torch.allclose(slimmed(images), masked(images), atol=1e-6)
    assert parameter_count(slimmed) < parameter_count(model)
    for name, mask in keep.items():
        assert model.get_submodule(name).num_features == mask.numel()  # the input model is unchanged
        assert slimmed.get_submodule(name).num_features == int(mask.sum())
        assert slimmed.get_submodule(name).running_var.numel() == int(mask.sum())


def test_slimming_refuses_what_it_cannot_follow():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

        def forward(self, x):
            return x + self.bn(self.conv(x))

    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), Residual(), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(UnsupportedCNNError, match="Residual"):
        slim_cnn_channels(net, {"1": torch.tensor([True, False])})
    sigmoid = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sigmoid(), nn.Conv2d(2, 2, 1))
    with pytest.raises(UnsupportedCNNError, match="does not map 0 to 0"):
        slim_cnn_channels(sigmoid, {"1": torch.tensor([True, False])})
    with pytest.raises(ValueError, match="removes every channel"):
        slim_cnn_channels(tiny_cnn(), {"features.0.1": torch.zeros(8, dtype=torch.bool)})


# --- INC: one-shot network_slimming --------------------------------------------------------------------------


def test_network_slimming_through_inc_masks_then_slims():
    model = tiny_cnn()
    expected = select_bn_channels(batchnorm_layers(model), 0.5)
    # selection reads only the BatchNorm scales, so no calibration data is needed
    pruning = inc_plugins.prepare_pruning(
        model, config(pruning_type="network_slimming", target_sparsity=0.5, pattern="1xchannel")
    )
    assert isinstance(pruning, NetworkSlimmingPruning) and PRUNERS["pt_network_slimming"] is NetworkSlimmingPruner
    assert pruning.report is not None
    assert pruning.result.keep.keys() == expected.keys()
    assert all(torch.equal(pruning.result.keep[name], expected[name]) for name in expected)
    assert sum(int((~mask).sum()) for mask in pruning.result.keep.values()) == int(0.5 * (8 + 16 + 32))
    (pruner,) = pruning.pruners
    for conv_name, bn_name in pruning.result.batchnorm_of.items():
        conv, bn, keep = model.get_submodule(conv_name), model.get_submodule(bn_name), pruning.result.keep[bn_name]
        assert torch.equal(pruner.masks[conv_name], conv.weight != 0)
        assert (conv.weight[~keep] == 0).all() and (bn.weight[~keep] == 0).all() and (bn.bias[~keep] == 0).all()
    small = inc_plugins.slim(model, pruning.result)
    with torch.no_grad():
        assert torch.allclose(small(IMAGES[1][0]), model(IMAGES[1][0]), atol=1e-6)
    assert parameter_count(small) < parameter_count(model)


def test_network_slimming_errors():
    no_bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(inc_plugins.PruningConfigError, match="BatchNorm"):
        inc_plugins.prepare_pruning(
            no_bn, config(pruning_type="network_slimming", target_sparsity=0.5, pattern="1xchannel"), dataloader=IMAGES
        )
    with pytest.raises(inc_plugins.PruningConfigError, match="every channel of some layer"):
        inc_plugins.prepare_pruning(
            tiny_cnn(), config(pruning_type="network_slimming", target_sparsity=0.97, pattern="1xchannel"),
            dataloader=IMAGES,
        )
    with pytest.raises(inc_plugins.PruningConfigError, match="set pattern '1xchannel'"):
        inc_plugins.prepare_pruning(
            tiny_cnn(), config(pruning_type="network_slimming", target_sparsity=0.5, pattern="1x1"), dataloader=IMAGES
        )


# --- INC: the bn_l1 regularizer in the training-aware flow --------------------------------------------------


def test_bn_l1_regularizer_adds_the_subgradient_before_each_optimizer_step():
    assert REGS["bn_l1"] is BNL1Regularizer
    model, reference = tiny_cnn(), tiny_cnn()
    model.train()
    reference.train()
    with torch.no_grad():
        model.features[1][1].weight[0] = 0.0  # sign(0) = 0: no push
        reference.features[1][1].weight[0] = 0.0
    lr, lam = 0.1, 0.01
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    pruning = inc_plugins.prepare_pruning(
        model,
        config(pruning_type="magnitude", target_sparsity=0.0, pattern="1xchannel", pruning_op_types=["Conv"],
               reg_type="bn_l1", parameters={"reg_coeff": lam}),
        optimizer=optimizer,
    )
    pruning.on_train_begin()
    images, labels = IMAGES[0]
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
    pruning.on_train_end()
    inc_plugins.complete_pruning(model, optimizer)

    torch.nn.functional.cross_entropy(reference(images), labels).backward()
    for i in range(3):
        gamma = reference.features[i][1].weight
        expected = gamma.detach() - lr * (gamma.grad + lam * torch.sign(gamma.detach()))
        assert torch.allclose(model.features[i][1].weight, expected, atol=1e-7)
    # everything else took a plain SGD step
    conv = reference.features[0][0].weight
    assert torch.allclose(model.features[0][0].weight, conv.detach() - lr * conv.grad, atol=1e-7)


def test_bn_l1_needs_a_positive_coefficient():
    optimizer = torch.optim.SGD(tiny_cnn().parameters(), lr=0.1)
    with pytest.raises(inc_plugins.PruningConfigError, match="reg_coeff > 0.*parameters"):
        inc_plugins.prepare_pruning(
            tiny_cnn(),
            config(pruning_type="magnitude", target_sparsity=0.0, pattern="1xchannel", reg_type="bn_l1", reg_coeff=0.01),
            optimizer=optimizer,
        )
