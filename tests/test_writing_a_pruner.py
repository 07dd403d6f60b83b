"""docs/writing_a_pruner.md's example, run for real: a new one-shot pruning type ("l1_channel") is a settings
model, a `prune` method and one registration line, and then runs through `inc_plugins.prepare_pruning`."""

import copy

import pytest
import torch
from neural_compressor.compression.pruner.pruners.base import PRUNERS
from neural_compressor.compression.pruner.pruning import PRUNINGS
from pydantic import Field

import inc_plugins
from inc_plugins import OneShotPruning, PluginSettings, register_one_shot_pruning
from inc_plugins.inc import one_shot
from tests.fixtures.calibration_data import image_batches
from tests.fixtures.tiny_models import tiny_cnn

IMAGES = image_batches(n_batches=2, batch_size=4)

# --- the docs/writing_a_pruner.md example (with `from inc_plugins import OneShotPruning, PluginSettings, ...`) ---


class L1ChannelSettings(PluginSettings):
    """The keys of a ``pruning_type="l1_channel"`` config entry (``target_sparsity`` comes from PluginSettings)."""

    min_channels: int = Field(1, ge=1, le=100_000, description="output channels every layer keeps, at least")


class L1ChannelPruning(OneShotPruning):
    """Prunes, in each selected layer, the output channels whose weights have the smallest L1 norm."""

    @torch.no_grad()
    def prune(self, dataloader, loss_func):
        for pruner, settings in zip(self.pruners, self.settings):  # one INC pruner per config entry
            for name, layer in pruner.modules.items():
                norms = layer.weight.abs().flatten(1).sum(dim=1)  # [out_channels]
                count = min(int(settings.target_sparsity * len(norms)), len(norms) - settings.min_channels)
                keep = torch.ones_like(norms, dtype=torch.bool)
                keep[norms.argsort()[:max(count, 0)]] = False
                mask = keep.view(-1, *[1] * (layer.weight.dim() - 1)).expand_as(layer.weight).clone()
                layer.weight.mul_(mask)
                pruner.masks[name] = mask  # bool, the weight's shape, True = kept


def register_l1_channel():  # in inc_plugins/inc/registry.py this is the one line
    register_one_shot_pruning("l1_channel", settings=L1ChannelSettings, needs_data=False,
                              default_pattern="1xchannel")(L1ChannelPruning)

# --- end of the docs/writing_a_pruner.md example ----------------------------------------------------------------------


@pytest.fixture
def l1_channel(monkeypatch):
    """Registers the example for one test; the registries are as before afterwards."""
    for registry in ("ONE_SHOT_TYPES", "PLUGIN_SETTINGS_MODELS", "TYPE_CONFIG_KEYS", "PLUGIN_CONFIG_KEYS"):
        monkeypatch.setattr(one_shot, registry, copy.copy(getattr(one_shot, registry)))
    monkeypatch.setitem(PRUNINGS, "l1_channel_pruning", None)
    monkeypatch.setitem(PRUNERS, "pt_l1_channel", None)
    register_l1_channel()
    return "l1_channel"


def smallest_l1_channels(weight, count):
    return set(weight.abs().flatten(1).sum(dim=1).argsort()[:count].tolist())


def test_the_example_prunes_the_smallest_l1_channels_through_prepare_pruning(l1_channel):
    model, dense = tiny_cnn(), tiny_cnn()
    config = inc_plugins.pruning_config(pruning_configs=[{"pruning_type": l1_channel, "target_sparsity": 0.5}])
    pruning = inc_plugins.prepare_pruning(model, config, dataloader=IMAGES)

    assert isinstance(pruning, L1ChannelPruning) and pruning.report is not None
    (pruner,) = pruning.pruners
    assert pruner.config["pattern"] == "1xchannel"  # the type's default pattern
    assert list(pruner.modules) == ["features.0.0", "features.1.0", "features.2.0"]  # the classifier head stays dense
    for name, layer in pruner.modules.items():
        original = dense.get_submodule(name).weight
        pruned = {int(c) for c in (~pruner.masks[name].flatten(1).any(dim=1)).nonzero().flatten()}
        assert pruned == smallest_l1_channels(original, layer.out_channels // 2), name
        assert torch.equal(pruner.masks[name], layer.weight != 0), name
        assert pruning.result.layer_sparsity[name] == pytest.approx(0.5)
    assert torch.equal(model.classifier.weight, dense.classifier.weight)
    assert inc_plugins.plugin_settings_model(l1_channel) is L1ChannelSettings
    assert one_shot.TYPE_CONFIG_KEYS[l1_channel] == {"min_channels"}


def test_the_example_needs_no_data_and_reads_its_own_key(l1_channel):
    model = tiny_cnn()
    config = inc_plugins.pruning_config(pruning_configs=[
        {"pruning_type": l1_channel, "target_sparsity": 0.9, "min_channels": 4, "op_names": ["features.0.0"]}])
    (pruner,) = inc_plugins.prepare_pruning(model, config).pruners
    assert int(pruner.masks["features.0.0"].flatten(1).any(dim=1).sum()) == 4  # 8 channels, at least 4 kept


@pytest.mark.parametrize("entry, message", [
    ({"min_channels": 0}, r"min_channels must be a whole number in \[1, 100000\], got 0"),
    ({"min_channels": True}, r"min_channels must be a whole number .*got True"),
    ({"min_channel": 2}, r"pruning_type 'l1_channel' has no config key 'min_channel'\. Did you mean 'min_channels'\?"),
])
def test_the_example_gets_the_settings_errors_for_free(l1_channel, entry, message):
    config = inc_plugins.pruning_config(pruning_configs=[{"pruning_type": l1_channel, "target_sparsity": 0.5, **entry}])
    with pytest.raises(inc_plugins.PruningConfigError, match=message):
        inc_plugins.prepare_pruning(tiny_cnn(), config)
