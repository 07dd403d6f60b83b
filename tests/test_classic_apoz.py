"""Network trimming: APoZ math, the activation-site monitor, the one-shot `network_trimming` type and the
training-aware `apoz` criterion."""

import pytest
import torch
from neural_compressor.compression.pruner.criteria import CRITERIA
from neural_compressor.compression.pruner.pruners.base import PRUNERS
from torch import nn

import inc_plugins
from inc_plugins.algorithms.apoz import apoz, channels_to_prune
from inc_plugins.execution.apoz_monitor import APoZMonitor
from inc_plugins.inc.apoz_criterion import APoZCriterion
from inc_plugins.inc.network_trimming import NetworkTrimmingPruner, NetworkTrimmingPruning
from inc_plugins.models.activations import activation_kind
from tests.fixtures.calibration_data import image_batches, token_batches
from tests.fixtures.tiny_models import tiny_bert_classifier, tiny_cnn

IMAGES = image_batches(n_batches=2, batch_size=8)
TOKENS = token_batches(n_batches=2, batch_size=4, seq_len=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**entry):
    return inc_plugins.pruning_config(pruning_configs=[entry])


# --- the math ------------------------------------------------------------------------------------------------


def test_apoz_matches_a_hand_count():
    # [batch 2, channels 3, 2x2]: channel 0 has 2 zeros of 8, channel 1 is all zero, channel 2 has none
    x = torch.ones(2, 3, 2, 2)
    x[0, 0, 0, 0] = 0.0
    x[1, 0, 1, 1] = 0.0
    x[:, 1] = 0.0
    assert torch.equal(apoz(x, channel_dim=1), torch.tensor([0.25, 1.0, 0.0], dtype=torch.float64))
    # channels last ([tokens, neurons]): neuron 1 is zero in 2 of 3 rows
    y = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 4.0]])
    assert torch.allclose(apoz(y, channel_dim=-1), torch.tensor([0.0, 2 / 3], dtype=torch.float64))


def test_apoz_threshold_counts_near_zero_values():
    x = torch.tensor([[[0.01], [-0.02], [0.5], [-0.3]]])  # [1, 4 positions, 1 channel]
    assert apoz(x, channel_dim=-1).item() == 0.0
    assert apoz(x, channel_dim=-1, threshold=0.05).item() == 0.5
    assert apoz(x, channel_dim=-1, threshold=0.3).item() == 0.75  # |x| <= t, inclusive


def test_apoz_leaves_out_masked_positions():
    x = torch.tensor([[[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])  # [batch 1, seq 3, 2 neurons]
    valid = torch.tensor([[1, 1, 0]])
    assert torch.equal(apoz(x, -1, valid=valid), torch.tensor([1.0, 0.5], dtype=torch.float64))


def test_activation_kinds():
    assert activation_kind(nn.ReLU()) == "exact_zero"
    assert activation_kind(nn.ReLU6()) == "exact_zero"
    assert activation_kind(nn.GELU()) == "smooth"
    assert activation_kind(nn.SiLU()) == "smooth"
    assert activation_kind(nn.LeakyReLU()) == "smooth"
    assert activation_kind(nn.BatchNorm2d(3)) is None
    assert activation_kind(nn.Linear(2, 2)) is None


# --- the monitor ---------------------------------------------------------------------------------------------


def conv_bn_relu_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.ReLU())
    net[1].running_mean.normal_()
    return net.eval()


def test_monitor_reads_the_relu_after_conv_and_batchnorm():
    net = conv_bn_relu_net()
    x = torch.randn(5, 1, 6, 6)
    with APoZMonitor(net, {"0": net[0], "3": net[3]}) as monitor, torch.no_grad():
        net(x)
    values = monitor.apoz()
    with torch.no_grad():
        first = torch.relu(net[1](net[0](x)))
        second = torch.relu(net[3](first))
    assert torch.allclose(values["0"], (first == 0).double().mean(dim=(0, 2, 3)))
    assert torch.allclose(values["3"], (second == 0).double().mean(dim=(0, 2, 3)))
    assert monitor.sites["0"].activation == "2" and monitor.sites["0"].batchnorms == ["1"]
    assert monitor.sites["3"].activation == "4" and monitor.sites["3"].batchnorms == []


def test_monitor_handles_a_shared_relu_instance():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu = nn.Linear(3, 4), nn.Linear(4, 2), nn.ReLU()

        def forward(self, x):
            return self.relu(self.b(self.relu(self.a(x))))

    torch.manual_seed(1)
    model, x = Shared(), torch.randn(16, 3)
    with APoZMonitor(model, {"a": model.a, "b": model.b}) as monitor, torch.no_grad():
        model(x)
        hidden = torch.relu(model.a(x))
        out = torch.relu(model.b(hidden))
    values = monitor.apoz()
    assert torch.allclose(values["a"], (hidden == 0).double().mean(0))
    assert torch.allclose(values["b"], (out == 0).double().mean(0))


def test_monitor_errors_name_the_problem():
    net = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="GELU.*threshold"):
        with APoZMonitor(net, {"0": net[0]}), torch.no_grad():
            net(torch.randn(2, 3))
    monitor = APoZMonitor(net, {"2": net[2]})  # nothing follows the last layer
    with monitor, torch.no_grad():
        net(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"no activation output was seen for \['2'\]"):
        monitor.apoz()


def test_channels_to_prune_takes_the_highest_apoz():
    values = {"a": torch.tensor([0.9, 0.1, 0.5, 0.95]), "b": torch.tensor([0.2, 0.99])}
    local = channels_to_prune(values, 0.5, "local")
    assert local["a"].tolist() == [False, True, True, False] and local["b"].tolist() == [True, False]
    global_ = channels_to_prune(values, 0.5, "global")  # 3 of 6: 0.99, 0.95, 0.9
    assert global_["a"].tolist() == [False, True, True, False] and global_["b"].tolist() == [True, False]
    # global never empties a layer: b keeps its lower-APoZ channel although 0.2 > 0.1
    kept = channels_to_prune({"a": torch.tensor([0.0, 0.1]), "b": torch.tensor([0.9, 0.8])}, 0.5, "global")
    assert kept["b"].sum() == 1 and kept["a"].tolist() == [True, False]
    with pytest.raises(ValueError, match="every channel of some layer"):
        channels_to_prune({"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.3, 0.4])}, 0.75, "global")


# --- one-shot network_trimming through INC -------------------------------------------------------------------


def test_registered_in_inc():
    assert PRUNERS["pt_network_trimming"] is NetworkTrimmingPruner
    assert CRITERIA["apoz"] is APoZCriterion
    assert inc_plugins.is_one_shot("network_trimming") and not inc_plugins.is_one_shot("apoz")
    assert {"network_trimming", "apoz"} <= set(inc_plugins.known_pruning_types())


def test_network_trimming_prunes_the_highest_apoz_channels_of_tiny_cnn():
    model = tiny_cnn()
    reference = APoZMonitor(model, {f"features.{i}.0": model.features[i][0] for i in range(3)})
    with reference, torch.no_grad():
        for images, _ in IMAGES:
            model(images)
    expected = channels_to_prune(reference.apoz(), 0.5, "local")

    pruning = inc_plugins.prepare_pruning(
        model, config(pruning_type="network_trimming", target_sparsity=0.5, pattern="1xchannel", pruning_scope="local"),
        dataloader=IMAGES,
    )
    assert isinstance(pruning, NetworkTrimmingPruning)
    assert pruning.report is not None
    (pruner,) = pruning.pruners
    for i in range(3):
        name, conv, bn = f"features.{i}.0", model.features[i][0], model.features[i][1]
        keep = pruning.result.keep[name]
        assert torch.equal(keep, expected[name])
        assert int((~keep).sum()) == conv.out_channels // 2
        assert torch.equal(pruner.masks[name], conv.weight != 0)
        assert (conv.weight[~keep] == 0).all() and (bn.weight[~keep] == 0).all() and (bn.bias[~keep] == 0).all()
        assert pruning.result.sites[name].batchnorms == [f"features.{i}.1"]
    # a pruned channel is silent after its ReLU
    outputs = {}
    handle = model.features[0][2].register_forward_hook(lambda m, a, out: outputs.setdefault("relu", out))
    with torch.no_grad():
        model(IMAGES[0][0])
    handle.remove()
    assert (outputs["relu"][:, ~pruning.result.keep["features.0.0"]] == 0).all()


def test_network_trimming_on_tiny_bert_ffn_counts_only_real_tokens():
    model = tiny_bert_classifier()
    names = [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    acts = {i: [] for i in range(2)}
    handles = [
        model.bert.encoder.layer[i].intermediate.intermediate_act_fn.register_forward_hook(
            lambda m, a, out, i=i: acts[i].append(out))
        for i in range(2)
    ]
    with torch.no_grad():
        for batch in TOKENS:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    expected = {}
    for i, name in enumerate(names):
        rows = torch.cat([out[batch["attention_mask"].bool()] for out, batch in zip(acts[i], TOKENS)])
        expected[name] = (rows.abs() <= 0.05).double().mean(0)

    pruning = inc_plugins.prepare_pruning(
        model,
        config(pruning_type="network_trimming", target_sparsity=0.25, pattern="1xchannel",
               op_names=["intermediate.dense"], apoz_threshold=0.05, pruning_scope="local"),
        dataloader=TOKENS,
    )
    assert pruning.report is not None
    for i, name in enumerate(names):
        assert torch.allclose(pruning.result.apoz[name], expected[name])
        dense = model.bert.encoder.layer[i].intermediate.dense
        keep = pruning.result.keep[name]
        assert int((~keep).sum()) == 16
        assert (dense.weight[~keep] == 0).all() and (dense.bias[~keep] == 0).all()
        assert (dense.weight[keep] != 0).any(dim=1).all()


def test_network_trimming_errors():
    with pytest.raises(inc_plugins.PruningConfigError, match="GELUActivation.*threshold"):
        inc_plugins.prepare_pruning(
            tiny_bert_classifier(),
            config(pruning_type="network_trimming", target_sparsity=0.25, pattern="1xchannel", op_names=["intermediate.dense"]),
            dataloader=TOKENS,
        )
    with pytest.raises(inc_plugins.PruningConfigError, match="no activation output.*attention.self.query"):
        inc_plugins.prepare_pruning(
            tiny_bert_classifier(),
            config(pruning_type="network_trimming", target_sparsity=0.25, pattern="1xchannel", op_names=["query"],
                   apoz_threshold=0.05),
            dataloader=TOKENS,
        )
    with pytest.raises(inc_plugins.PruningConfigError, match="set pattern '1xchannel'"):
        inc_plugins.prepare_pruning(
            tiny_cnn(), config(pruning_type="network_trimming", target_sparsity=0.5, pattern="4x1"), dataloader=IMAGES
        )
    with pytest.raises(inc_plugins.PruningConfigError, match="every channel of some layer"):
        inc_plugins.prepare_pruning(
            tiny_cnn(), config(pruning_type="network_trimming", target_sparsity=0.99, pattern="1xchannel"),
            dataloader=IMAGES,
        )
    with pytest.raises(inc_plugins.PruningConfigError, match="apoz_threshold"):
        inc_plugins.prepare_pruning(
            tiny_cnn(), config(pruning_type="network_trimming", target_sparsity=0.5, pattern="1xchannel",
                               apoz_threshold=-1), dataloader=IMAGES,
        )


# --- the training-aware criterion ----------------------------------------------------------------------------


def test_apoz_criterion_prunes_high_apoz_filters_during_training():
    model = tiny_cnn()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the APoZ ranking stays that of the start
    reference = APoZMonitor(model, {f"features.{i}.0": model.features[i][0] for i in range(3)})
    pruning = inc_plugins.prepare_pruning(
        model,
        config(pruning_type="apoz", target_sparsity=0.5, pattern="1xchannel", start_step=1, end_step=2,
               pruning_scope="local", pruning_op_types=["Conv"]),
        optimizer=optimizer,
    )
    pruning.on_train_begin()
    with reference:
        for images, labels in IMAGES:  # step 0 (no scores yet), step 1 (schedule starts at 0 sparsity)
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
    expected = channels_to_prune(reference.apoz(), 0.5, "local")
    images, labels = IMAGES[0]
    torch.nn.functional.cross_entropy(model(images), labels).backward()  # step 2: prunes to 0.5
    optimizer.step()
    pruning.on_train_end()
    inc_plugins.complete_pruning(model, optimizer)
    for i in range(3):
        name = f"features.{i}.0"
        filters_zero = (model.features[i][0].weight.flatten(1) == 0).all(dim=1)
        assert torch.equal(~filters_zero, expected[name]), name
    criterion = pruning.pruners[0].criterion
    assert criterion.monitor is not None and criterion.monitor._handles == []  # hooks gone after end_step


def test_apoz_criterion_needs_steps_and_a_channel_pattern():
    optimizer = torch.optim.SGD(tiny_cnn().parameters(), lr=0.1)
    with pytest.raises(inc_plugins.PruningConfigError, match="end_step >= 1"):
        inc_plugins.prepare_pruning(
            tiny_cnn(), config(pruning_type="apoz", target_sparsity=0.5, pattern="1xchannel", end_step=0),
            optimizer=optimizer,
        )
    with pytest.raises(inc_plugins.PruningConfigError, match="set pattern '1xchannel'"):
        inc_plugins.prepare_pruning(
            tiny_cnn(), config(pruning_type="apoz", target_sparsity=0.5, pattern="4x1", end_step=2), optimizer=optimizer
        )
