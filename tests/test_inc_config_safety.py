"""Config safety at the entry point: INC's shared mutable defaults, exact pattern parsing, each plugin type's own
default pattern, and unknown plugin keys."""

import pytest
import torch
from neural_compressor import WeightPruningConfig
from neural_compressor.compression.pruner import prepare_pruning as inc_prepare_pruning

import inc_plugins
from inc_plugins.inc.config import restore_inc_defaults
from inc_plugins.inc.config_checks import check_pruner_settings
from inc_plugins.inc.one_shot import default_pattern
from inc_plugins.models.layer_views import weight_matrix
from tests.fixtures.calibration_data import token_batches
from tests.fixtures.tiny_models import tiny_bert_classifier, tiny_llama_lm

LM_BATCHES = token_batches(3, 2, 16, labels="lm")
TOKENS = token_batches(2, 2, 8)


@pytest.fixture
def inc_defaults_polluted_by_inc_itself():
    """INC's own prepare_pruning, trained until it prunes: it writes its resolved settings (snip_momentum, 0.7,
    op_names ["q_proj"], the auto-excluded lm_head) into WeightPruningConfig's default arguments."""
    model = tiny_llama_lm().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = WeightPruningConfig(pruning_type="snip_momentum", target_sparsity=0.7, op_names=["q_proj"],
                                 pruning_scope="local", start_step=0, end_step=4, pruning_frequency=2)
    pruning = inc_prepare_pruning(model, config, optimizer=optimizer)
    train(model, pruning, optimizer, 6)
    assert abs(sparsity(model, "q_proj")["model.layers.0.self_attn.q_proj"] - 0.7) < 0.02
    assert WeightPruningConfig().pruning_configs[0].get("target_sparsity") == 0.7  # the bug is there
    yield
    restore_inc_defaults()  # so later tests' raw INC calls start clean


def train(model, pruning, optimizer, steps):
    pruning.on_train_begin()
    for step in range(steps):
        pruning.on_step_begin(step)
        model(**LM_BATCHES[step % len(LM_BATCHES)]).loss.backward()
        pruning.on_before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        pruning.on_after_optimizer_step()
        pruning.on_step_end()
    pruning.on_train_end()
    inc_plugins.complete_pruning(model, optimizer)


def sparsity(model, name_part=""):
    return {name: (m.weight == 0).float().mean().item() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name_part in name and name != "lm_head"}


# --- INC's shared defaults ----------------------------------------------------------------------------------


def test_a_default_built_config_prunes_what_it_asks_after_inc_polluted_the_defaults(
        inc_defaults_polluted_by_inc_itself):
    config = WeightPruningConfig(pruning_type="snip_momentum", target_sparsity=0.3, pruning_scope="local",
                                 start_step=0, end_step=4, pruning_frequency=2)
    model = tiny_llama_lm().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, inc_plugins.prepare_pruning(model, config, optimizer=optimizer), optimizer, 6)

    result = sparsity(model)
    assert len(result) == 14  # every Linear of both layers: attention and MLP
    assert all(abs(s - 0.3) < 0.02 for s in result.values()), result
    assert not any(s > 0.5 for s in result.values()), result


def test_the_entry_point_restores_inc_defaults_without_touching_the_callers_config(inc_defaults_polluted_by_inc_itself):
    config = WeightPruningConfig(pruning_type="magnitude", target_sparsity=0.3)
    polluted = (config.pruning_configs, config.weight_compression["excluded_op_names"])
    before = [dict(e) for e in config.pruning_configs], list(polluted[1])
    model = tiny_llama_lm()
    inc_plugins.prepare_pruning(model, config, optimizer=torch.optim.SGD(model.parameters(), lr=0))
    inc_plugins.complete_pruning(model)

    fresh = WeightPruningConfig()
    assert fresh.pruning_configs == [{}] and fresh.weight_compression["excluded_op_names"] == []
    assert fresh.weight_compression["op_names"] == []
    assert fresh.weight_compression["pruning_op_types"] == ["Conv", "Linear"]
    # the caller's config still holds the very objects it held, unchanged (replaced in INC, not emptied)
    assert config.pruning_configs is polluted[0] and config.weight_compression["excluded_op_names"] is polluted[1]
    assert ([dict(e) for e in config.pruning_configs], list(polluted[1])) == before


def test_inc_resolved_settings_mixed_into_the_callers_entries_are_refused(inc_defaults_polluted_by_inc_itself):
    resolved_entry = WeightPruningConfig().pruning_configs[0]  # INC's default entry, filled in by INC
    config = WeightPruningConfig(pruning_configs=[resolved_entry], op_names=[], excluded_op_names=[])
    model = tiny_llama_lm()
    with pytest.raises(inc_plugins.PruningConfigError, match=r"pruning_configs entry 0 is INC's shared default"):
        inc_plugins.prepare_pruning(model, config, optimizer=torch.optim.SGD(model.parameters(), lr=0))


# --- patterns -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["garbage_1x1", "0x4", "1x0", "xmha", "4x1x2", "04x1", "1x01", "channelxchannel",
                                     "0:4", "2:04", "mha_1", "4by1", "", "1x", "x1", " 1x1"])
def test_patterns_inc_would_misread_are_refused_naming_the_value_and_the_forms(pattern):
    with pytest.raises(inc_plugins.PruningConfigError) as caught:
        check_pruner_settings({"pruning_type": "magnitude", "target_sparsity": 0.3, "pattern": pattern})
    message = str(caught.value)
    assert f"pattern {pattern!r} is not understood" in message and "'N:M' with 0 < N < M" in message
    assert "\n" not in message


def test_a_prefixed_pattern_suggests_the_form_inc_would_have_run():
    with pytest.raises(inc_plugins.PruningConfigError, match=r"'garbage_1x1' is not understood.*Did you mean '1x1'\?"):
        check_pruner_settings({"pruning_type": "magnitude", "target_sparsity": 0.3, "pattern": "garbage_1x1"})


@pytest.mark.parametrize("pattern", ["1x0", "0x4", "garbage_1x1"])
def test_bad_patterns_are_refused_by_the_entry_point_before_inc_runs(pattern):
    model = tiny_bert_classifier()
    config = inc_plugins.pruning_config(pruning_type="magnitude", target_sparsity=0.3, pattern=pattern)
    with pytest.raises(inc_plugins.PruningConfigError, match=f"pattern {pattern!r} is not understood"):
        inc_plugins.prepare_pruning(model, config, optimizer=torch.optim.SGD(model.parameters(), lr=0))


@pytest.mark.parametrize("pattern", ["1x1", "4x1", "1x16", "32x32", "channelx1", "channelx4", "1xchannel",
                                     "2xchannel", "1:4", "2:4", "5:8", "mha"])
def test_every_spelling_inc_implements_is_accepted(pattern):
    check_pruner_settings({"pruning_type": "magnitude", "target_sparsity": 0.2, "pattern": pattern})


def test_pattern_lock_may_keep_more_zeros_than_its_n_m_pattern_reaches():
    """INC does not bound pattern_lock's target by N/M (it only keeps existing zeros)."""
    check_pruner_settings({"pruning_type": "pattern_lock", "target_sparsity": 0.9, "pattern": "2:4"})


# --- each plugin type's default pattern ---------------------------------------------------------------------


def test_each_type_has_its_own_default_pattern():
    assert default_pattern("wanda") == "1x1"
    assert {default_pattern(t) for t in ("network_trimming", "network_slimming", "particle_filter",
                                         "mask_search")} == {"1xchannel"}
    assert default_pattern("magnitude") == default_pattern("snip_momentum") == "4x1"
    check_pruner_settings({"pruning_type": "wanda", "target_sparsity": 0.5})
    check_pruner_settings({"pruning_type": "wanda", "target_sparsity": 0.5, "pattern": None})


def test_wanda_without_a_pattern_prunes_unstructured_per_row():
    model = tiny_llama_lm()
    config = WeightPruningConfig(pruning_configs=[{"pruning_type": "wanda", "target_sparsity": 0.5,
                                                   "op_names": ["model.layers"]}])
    pruning = inc_plugins.prepare_pruning(model, config, dataloader=token_batches(2, 2, 16))

    assert [p.config["pattern"] for p in pruning.pruners] == ["1x1"]
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")}
    assert len(linears) == 14
    for name, module in linears.items():
        matrix = weight_matrix(module)
        assert ((matrix == 0).sum(dim=1) == matrix.shape[1] // 2).all(), name
    assert (model.lm_head.weight != 0).all()


def test_a_global_pattern_the_user_set_is_kept_for_plugin_entries():
    config = WeightPruningConfig(pruning_configs=[{"pruning_type": "wanda", "target_sparsity": 0.5}], pattern="8x1",
                                 op_names=[], excluded_op_names=[])
    with pytest.raises(inc_plugins.PruningConfigError, match="pattern '8x1': Wanda supports '1x1'"):
        inc_plugins.prepare_pruning(tiny_llama_lm(), config, dataloader=token_batches(1, 2, 16))


# --- unknown plugin keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "global"])
def test_an_unknown_plugin_key_is_refused_naming_the_allowed_keys(where):
    entry = {"pruning_type": "wanda", "target_sparsity": 0.5}
    config = (inc_plugins.pruning_config(pruning_configs=[{**entry, "sparsity_warmup": True}]) if where == "local"
              else inc_plugins.pruning_config(**entry, sparsity_warmup=True))
    with pytest.raises(inc_plugins.PruningConfigError,
                       match=r"pruning_type 'wanda' has no config key 'sparsity_warmup'\. .*Its own keys: "
                             r"comparison_group, dsnot, layer_sparsity, owl_lambda, owl_m, update_weights, use_variant; "
                             r"INC's keys: .*op_names"):
        inc_plugins.prepare_pruning(tiny_llama_lm(), config, dataloader=token_batches(1, 2, 16))


def test_a_misspelt_plugin_key_suggests_the_nearest():
    with pytest.raises(inc_plugins.PruningConfigError, match=r"no config key 'comparison_grup'\. Did you mean "
                                                             r"'comparison_group'\?"):
        check_pruner_settings({"pruning_type": "wanda", "target_sparsity": 0.5, "comparison_grup": "per_output"})


def test_a_global_plugin_key_read_by_another_entry_is_not_an_error():
    """Global keys reach every entry; each of these two types reads one of them and ignores the other."""
    model = tiny_bert_classifier()
    config = inc_plugins.pruning_config(
        pruning_configs=[{"pruning_type": "wanda", "target_sparsity": 0.5, "op_names": ["attention"]},
                         {"pruning_type": "network_trimming", "target_sparsity": 0.25,
                          "op_names": ["intermediate.dense"], "pruning_scope": "local"}],
        comparison_group="per_output", apoz_threshold=0.05,
    )
    wanda, trimming = inc_plugins.prepare_pruning(model, config, dataloader=TOKENS)
    assert [p.config["pattern"] for p in wanda.pruners] == ["1x1"]
    assert [p.config["pattern"] for p in trimming.pruners] == ["1xchannel"]
    assert all(int((~keep).sum()) == 16 for keep in trimming.result.keep.values())
