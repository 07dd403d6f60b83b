"""The INC entry point: version check, registration, routing, config isolation, and INC's built-ins through it."""

import copy

import pytest
import torch
from neural_compressor import WeightPruningConfig
from neural_compressor.compression.pruner import prepare_pruning as inc_prepare_pruning
from neural_compressor.compression.pruner.pruning import PRUNINGS, BasicPruning, SparseGPTPruning
from pydantic import Field

import inc_plugins
from inc_plugins.inc import one_shot
from inc_plugins.inc.compat import IncompatibleINCError, check_inc_version
from tests.fixtures.calibration_data import token_batches
from tests.fixtures.tiny_models import tiny_bert_classifier, tiny_llama_lm, tiny_opt_lm


def linear_sparsity(model, name_filter):
    return {
        name: (m.weight == 0).float().mean().item()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name_filter(name)
    }


# --- version check -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["3.7", "3.7.0", "3.7.1"])
def test_version_check_accepts_3_7(version):
    check_inc_version(version)


@pytest.mark.parametrize("version", ["3.8.0", "3.6.1", "2.6", "4.0.0"])
def test_version_check_rejects_other_series_with_the_fix(version):
    with pytest.raises(IncompatibleINCError, match=rf"{version}.*3\.7\.x.*pip install 'neural-compressor==3\.7\.1'"):
        check_inc_version(version)


def test_version_check_when_inc_is_missing():
    with pytest.raises(IncompatibleINCError, match="not installed"):
        check_inc_version(None)


# --- registration and routing --------------------------------------------------------------------------------


class RecordingPruning:
    """A stand-in one-shot pruning class that records what the entry point hands it."""

    calls: list = []

    def __init__(self, infos, model, dataloader, loss_func, device):
        RecordingPruning.calls.append({"infos": infos, "model": model, "dataloader": dataloader})


class RecordingSettings(inc_plugins.PluginSettings):
    flavour: str | None = Field(None, description="a key only the recording type reads")


@pytest.fixture
def recording_type(monkeypatch):
    for registry in ("ONE_SHOT_TYPES", "PLUGIN_SETTINGS_MODELS", "TYPE_CONFIG_KEYS", "PLUGIN_CONFIG_KEYS"):
        monkeypatch.setattr(one_shot, registry, copy.copy(getattr(one_shot, registry)))
    monkeypatch.setitem(PRUNINGS, "recording_pruning", RecordingPruning)
    one_shot.register_one_shot_pruning("recording", settings=RecordingSettings)(RecordingPruning)
    RecordingPruning.calls = []
    return "recording"


def test_import_registers_the_plugins_in_inc_registries():
    from neural_compressor.compression.pruner.criteria import CRITERIA
    from neural_compressor.compression.pruner.pruners import PRUNERS

    assert PRUNERS["pt_wanda"].__module__ == "inc_plugins.inc.wanda"
    assert CRITERIA["wanda_score"].__module__ == "inc_plugins.inc.wanda_score_criterion"
    assert PRUNINGS["wanda_pruning"].__module__ == "inc_plugins.inc.wanda"
    assert PRUNINGS["mask_search_pruning"].__module__ == "inc_plugins.inc.mask_search"
    assert {"wanda", "mask_search", "wanda_score", "magnitude", "sparse_gpt"} <= set(inc_plugins.known_pruning_types())
    assert inc_plugins.is_one_shot("wanda") and inc_plugins.is_one_shot("mask_search")
    assert not inc_plugins.is_one_shot("wanda_score")


def test_every_plugin_type_declares_its_keys_once_in_a_described_settings_model():
    for pruning_type in ("wanda", "mask_search", "network_trimming", "network_slimming", "particle_filter"):
        model = inc_plugins.plugin_settings_model(pruning_type)
        assert issubclass(model, inc_plugins.PluginSettings) and model.model_json_schema()["properties"]
        assert one_shot.TYPE_CONFIG_KEYS[pruning_type] == set(model.model_fields) - one_shot.INC_CONFIG_KEYS
        for key, field in model.model_fields.items():
            assert field.description and "\n" not in field.description, (pruning_type, key)
    assert inc_plugins.plugin_settings_model("magnitude") is None
    assert one_shot.PLUGIN_CONFIG_KEYS == set().union(*one_shot.TYPE_CONFIG_KEYS.values())


@pytest.mark.parametrize("value, message", [
    (True, r"num_particles must be a whole number in \[1, 10000\], got True"),
    ("16", r"num_particles must be a whole number in \[1, 10000\], got '16'"),
    (10_001, r"num_particles must be a whole number in \[1, 10000\], got 10001"),
])
def test_plugin_settings_are_strict_and_bounded_with_one_line_errors(value, message):
    settings = inc_plugins.plugin_settings_model("particle_filter")
    with pytest.raises(inc_plugins.PruningConfigError, match=message) as caught:
        settings.from_config({"target_sparsity": 0.5, "pattern": "1xchannel", "num_particles": value})
    assert "\n" not in str(caught.value)


def test_registering_a_one_shot_type_puts_it_in_inc_registry(recording_type):
    assert PRUNINGS["recording_pruning"] is RecordingPruning
    assert recording_type in inc_plugins.known_pruning_types()
    assert inc_plugins.is_one_shot(recording_type)


@pytest.mark.parametrize("name", ["my_gpt", "retrain_fast", "block_x", "freebie"])
def test_names_that_inc_dispatches_on_are_refused(name):
    with pytest.raises(ValueError, match="reserves"):
        one_shot.register_one_shot_pruning(name, settings=inc_plugins.PluginSettings)


def test_routing_sends_plugin_types_to_plugin_code_and_the_rest_to_inc(recording_type):
    model = tiny_bert_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = token_batches(2, 2, 8, labels="classification")
    config = inc_plugins.pruning_config(
        pruning_configs=[
            {"pruning_type": "recording", "target_sparsity": 0.5, "pattern": "1x1", "op_names": ["intermediate"]},
            {"pruning_type": "magnitude", "target_sparsity": 0.3, "pattern": "4x1", "op_names": ["attention"]},
        ]
    )
    result = inc_plugins.prepare_pruning(model, config, optimizer=optimizer, dataloader=batches)
    inc_plugins.complete_pruning(model, optimizer)

    assert [type(r) for r in result] == [BasicPruning, RecordingPruning]
    (call,) = RecordingPruning.calls
    assert [info["pruning_type"] for info in call["infos"]] == ["recording"]
    assert call["infos"][0]["target_sparsity"] == 0.5 and call["dataloader"] is batches
    inc_pruner_types = [p.config["pruning_type"] for p in result[0].pruners]
    assert inc_pruner_types == ["magnitude"]


def test_plugin_keys_given_globally_reach_every_plugin_entry_without_inc_warnings(recording_type, caplog):
    config = inc_plugins.pruning_config(
        pruning_configs=[{"pruning_type": "recording", "target_sparsity": 0.5, "pattern": "1x1"},
                         {"pruning_type": "recording", "target_sparsity": 0.2, "pattern": "1x1", "flavour": "local"}],
        flavour="global",
    )
    with caplog.at_level("WARNING", logger="neural_compressor"):
        inc_plugins.prepare_pruning(tiny_bert_classifier(), config, dataloader=token_batches(1, 2, 8))
    (call,) = RecordingPruning.calls
    assert [info["flavour"] for info in call["infos"]] == ["global", "local"]
    assert "flavour is not supported" not in caplog.text


def test_plugin_keys_given_globally_also_reach_inc_flows(recording_type):
    """Plugin criteria (wanda_score, apoz) run inside INC's training-aware pruners and read plugin keys."""
    model = tiny_bert_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    config = inc_plugins.pruning_config(pruning_configs=[{"pruning_type": "magnitude", "pattern": "4x1"}],
                                        flavour="global", target_sparsity=0.5)
    pruning = inc_plugins.prepare_pruning(model, config, optimizer=optimizer)
    inc_plugins.complete_pruning(model, optimizer)
    assert pruning.pruners[0].config["flavour"] == "global"


def test_inc_only_configs_return_what_inc_returns():
    model = tiny_bert_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    config = inc_plugins.pruning_config(pruning_type="magnitude", target_sparsity=0.5, pattern="4x1")
    result = inc_plugins.prepare_pruning(model, config, optimizer=optimizer)
    inc_plugins.complete_pruning(model, optimizer)
    assert isinstance(result, BasicPruning)


def test_plugin_types_need_a_dataloader(recording_type):
    config = inc_plugins.pruning_config(pruning_type="recording", target_sparsity=0.5, pattern="1x1")
    with pytest.raises(inc_plugins.PruningConfigError, match="dataloader"):
        inc_plugins.prepare_pruning(tiny_bert_classifier(), config)


# --- config isolation ----------------------------------------------------------------------------------------


def resolved(pruning):
    return [dict(p.config) for p in pruning.pruners]


def test_inc_raw_configs_leak_settings_into_the_next_one():
    """Documents INC 3.7.1's bug that the helper and the entry point work around."""
    first = WeightPruningConfig(pruning_type="magnitude", target_sparsity=0.7)
    inc_prepare_pruning(tiny_bert_classifier(), first, optimizer=torch.optim.SGD([torch.zeros(1)], lr=0))
    second = WeightPruningConfig(target_sparsity=0.2)  # defaults: snip_momentum
    leaked = second.pruning_configs[0]
    assert leaked.get("pruning_type") == "magnitude" and leaked.get("target_sparsity") == 0.7
    torch.save = getattr(torch, "orig_save", torch.save)


def test_configs_built_one_after_another_do_not_leak():
    model = tiny_bert_classifier()
    first = inc_plugins.pruning_config(pruning_type="magnitude", target_sparsity=0.7, pattern="4x1",
                                       excluded_op_names=["pooler"])
    p1 = inc_plugins.prepare_pruning(model, first, optimizer=torch.optim.SGD(model.parameters(), lr=0))
    inc_plugins.complete_pruning(model)
    second = inc_plugins.pruning_config(target_sparsity=0.2, end_step=10)
    p2 = inc_plugins.prepare_pruning(model, second, optimizer=torch.optim.SGD(model.parameters(), lr=0))
    inc_plugins.complete_pruning(model)

    (s1,), (s2,) = resolved(p1), resolved(p2)
    assert (s1["pruning_type"], s1["target_sparsity"]) == ("magnitude", 0.7)
    assert (s2["pruning_type"], s2["target_sparsity"], s2["pattern"]) == ("snip_momentum", 0.2, "4x1")
    assert "pooler" in s1["excluded_op_names"] and "pooler" not in s2["excluded_op_names"]


def test_entry_point_never_writes_into_the_callers_config():
    config = WeightPruningConfig(pruning_type="magnitude", target_sparsity=0.6)
    before = copy.deepcopy((config.pruning_configs, dict(config.weight_compression)))
    model = tiny_bert_classifier()
    inc_plugins.prepare_pruning(model, config, optimizer=torch.optim.SGD(model.parameters(), lr=0))
    inc_plugins.complete_pruning(model)
    assert (config.pruning_configs, dict(config.weight_compression)) == before


# --- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"pruning_type": "magnitud"}, r"unknown pruning_type 'magnitud'\. Did you mean 'magnitude'\?"),
        ({"target_sparsity": 1.0}, r"target_sparsity must be a number in \[0, 1\), got 1\.0"),
        ({"target_sparsity": -0.1}, r"target_sparsity must be a number in \[0, 1\)"),
        ({"pattern": "4by1"}, r"pattern '4by1' is not understood"),
        ({"pattern": "4:2", "target_sparsity": 0.3}, r"needs 0 < N < M"),
        ({"pattern": "1:4", "target_sparsity": 0.5}, r"above what pattern '1:4' can reach"),
    ],
)
def test_bad_settings_get_clear_errors(settings, message):
    config = inc_plugins.pruning_config(**{"pruning_type": "magnitude", "target_sparsity": 0.5, **settings})
    model = tiny_bert_classifier()
    with pytest.raises(inc_plugins.PruningConfigError, match=message):
        inc_plugins.prepare_pruning(model, config, optimizer=torch.optim.SGD(model.parameters(), lr=0))


# --- INC's built-in pruners through the entry point ----------------------------------------------------------


def train_with_inc_callbacks(model, pruning, optimizer, batches, steps):
    pruning.on_train_begin()
    for step in range(steps):
        batch = batches[step % len(batches)]
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        pruning.on_step_end()
    pruning.on_train_end()
    inc_plugins.complete_pruning(model, optimizer)


@pytest.mark.parametrize("pruning_type", ["magnitude", "snip_momentum"])
def test_training_aware_builtins_reach_their_target(pruning_type):
    torch.manual_seed(0)
    model = tiny_bert_classifier().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = inc_plugins.pruning_config(
        pruning_type=pruning_type, target_sparsity=0.5, pattern="4x1", op_names=["encoder"], start_step=0,
        end_step=4, pruning_frequency=2, pruning_scope="local",
    )
    pruning = inc_plugins.prepare_pruning(model, config, optimizer=optimizer)
    train_with_inc_callbacks(model, pruning, optimizer, token_batches(3, 4, 12, labels="classification"), 6)

    sparsity = linear_sparsity(model, lambda n: "encoder" in n)
    assert len(sparsity) == 12
    assert all(abs(s - 0.5) < 0.02 for s in sparsity.values()), sparsity
    assert linear_sparsity(model, lambda n: n == "classifier")["classifier"] == 0.0
    assert not hasattr(model, "inc_hook_handle")


def test_sparse_gpt_runs_on_a_transformers5_decoder():
    model = tiny_llama_lm()
    batches = [{"input_ids": b["input_ids"]} for b in token_batches(3, 2, 16)]
    config = inc_plugins.pruning_config(
        pruning_configs=[{"pruning_type": "sparse_gpt", "target_sparsity": 0.5, "pattern": "1x1",
                          "op_names": ["model.layers"]}]
    )
    result = inc_plugins.prepare_pruning(model, config, dataloader=batches)

    assert isinstance(result, SparseGPTPruning)
    sparsity = linear_sparsity(model, lambda n: n.startswith("model.layers"))
    assert len(sparsity) == 14
    assert all(abs(s - 0.5) < 0.01 for s in sparsity.values()), sparsity
    assert "forward" not in model.model.layers[0].__dict__  # the tuple adapter is gone afterwards
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits).all()


def test_sparse_gpt_in_incs_own_calling_pattern_on_an_opt_decoder():
    """INC 3.7.1's test_pruning_sparsegpt.py calls prepare_pruning(model, config, dataloader=...) and then
    on_train_begin(dataloader), which runs INC's SparseGPT driver again."""
    model = tiny_opt_lm()
    batches = [{"input_ids": b["input_ids"]} for b in token_batches(3, 2, 16)]
    config = inc_plugins.pruning_config(pruning_configs=[{"pruning_type": "sparse_gpt", "target_sparsity": 0.5,
                                                          "pattern": "1x1", "op_names": ["model.decoder.layers"]}])
    pruning = inc_plugins.prepare_pruning(model, config, dataloader=batches)
    pruning.on_train_begin(batches)

    sparsity = linear_sparsity(model, lambda n: n.startswith("model.decoder.layers"))
    assert len(sparsity) == 12 and all(abs(s - 0.5) < 0.01 for s in sparsity.values()), sparsity
    assert "forward" not in model.model.decoder.layers[0].__dict__
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits).all()
    batches[1]["input_ids"] = batches[1]["input_ids"].float().fill_(float("nan"))
    with pytest.raises(inc_plugins.NonFiniteError, match="batch 1"):
        pruning.on_train_begin(batches)  # the same check as at prepare_pruning


def test_inc_sparse_gpt_without_the_adapter_breaks_on_transformers5():
    """Why the adapter exists: INC takes `layer(...)[0]`, a slice of the batch, as the next layer's input."""
    model = tiny_llama_lm()
    model.config.use_cache = False  # isolate the `[0]` bug from the KV-cache replay the adapter also handles
    batches = [{"input_ids": b["input_ids"]} for b in token_batches(2, 2, 16)]
    config = WeightPruningConfig(
        pruning_configs=[{"pruning_type": "sparse_gpt", "target_sparsity": 0.5, "pattern": "1x1",
                          "op_names": ["model.layers"]}], op_names=[], excluded_op_names=[],
    )
    with pytest.raises(RuntimeError, match="size of tensor"):
        inc_prepare_pruning(model, config, dataloader=batches)
