"""`prepare_pruning`: INC's entry point, extended to the project's one-shot pruners.

Configs whose pruning type is one of the plugins' one-shot types run the plugin's pruning class; every other
config goes to INC's own `prepare_pruning` unchanged, so INC's built-in pruners keep working through this door.
"""

import contextlib
import copy
import logging

import torch
from neural_compressor import WeightPruningConfig
from neural_compressor.compression.pruner import prepare_pruning as inc_prepare_pruning
from neural_compressor.compression.pruner.pruning import SparseGPTPruning
from neural_compressor.compression.pruner.utils import process_config

from inc_plugins.execution.distributed import world_size
from inc_plugins.execution.streamed_model import block_stream

from . import one_shot
from .config import inc_defaults_restored, private_copy
from .config_checks import PruningConfigError, check_pruner_settings
from .decoder_outputs import adapt_on_train_begin, sparse_gpt_run


def settings_per_pruner(config: WeightPruningConfig) -> list[dict]:
    """Each local entry merged over the global settings: what INC will resolve, before its assertions run."""
    global_settings = dict(config.weight_compression)
    locals_ = config.pruning_configs or [{}]
    return [{**global_settings, **{k: v for k, v in entry.items() if v is not None}} for entry in locals_]


def _give_type_default_patterns(config: WeightPruningConfig) -> None:
    """An entry with no pattern gets its pruning type's default, unless the user set a global pattern: INC would
    give it the global default "4x1", which e.g. Wanda and the channel pruners cannot run. (A global "4x1" set
    on purpose cannot be told from INC's default; the plugin types that refuse it lose nothing.)"""
    if config.weight_compression["pattern"] != one_shot.INC_DEFAULT_PATTERN:
        return
    for entry in config.pruning_configs:
        if entry.get("pattern") is None:
            entry["pattern"] = one_shot.default_pattern(entry.get("pruning_type") or config.weight_compression["pruning_type"])


def _check_entries(config: WeightPruningConfig, settings: list[dict]) -> None:
    """Check each pruner's settings. A plugin key set globally is inherited by every entry; it is not an error
    for an entry whose type does not read it when another entry's type does."""
    read_by = [one_shot.plugin_keys_read_by(entry["pruning_type"]) for entry in settings]
    for index, (local, entry) in enumerate(zip(config.pruning_configs, settings)):
        for_others = set().union(*(keys for other, keys in enumerate(read_by) if other != index))
        inherited = (set(config.weight_compression) - set(local)) & (for_others - read_by[index])
        check_pruner_settings({k: v for k, v in entry.items() if k not in inherited})


def _sub_config(config: WeightPruningConfig, local_entries: list[dict]) -> WeightPruningConfig:
    return WeightPruningConfig(pruning_configs=copy.deepcopy(local_entries), **copy.deepcopy(dict(config.weight_compression)))


def _with_plugin_keys(config: WeightPruningConfig, local_entries: list[dict]) -> list[dict]:
    """Local entries that inherit the plugins' extra keys given globally: INC only propagates its own keys."""
    extra = {k: v for k, v in config.weight_compression.items() if k in one_shot.PLUGIN_CONFIG_KEYS}
    return [{**extra, **entry} for entry in local_entries]


def _check_streamable(settings: list[dict], is_plugin: list[bool]) -> None:
    """A streamed model holds one block at a time and each block is written once: one streaming type prunes it."""
    types = sorted({entry["pruning_type"] for entry in settings})
    allowed = one_shot.streaming_types()
    refused = [t for t, plugin in zip((e["pruning_type"] for e in settings), is_plugin)
               if not plugin or t not in allowed]
    if refused:
        raise PruningConfigError(f"pruning type(s) {sorted(set(refused))} cannot prune a streamed model; streaming "
                                 f"runs {', '.join(allowed)}")
    if len(types) > 1:
        raise PruningConfigError(f"a streamed model is pruned in one pass per block, so one pruning type at a time: "
                                 f"got {types}; prune with one, then stream its output through the next")


def _check_distributable(settings: list[dict], is_plugin: list[bool]) -> None:
    """Across processes each rank holds a share of the calibration data: a one-shot plugin type must combine its
    statistics across ranks, or the ranks would derive different masks. (INC's training-aware types run on each
    rank as in any data-parallel training loop.)"""
    allowed = one_shot.distributed_types()
    refused = sorted({entry["pruning_type"] for entry, plugin in zip(settings, is_plugin)
                      if plugin and entry["pruning_type"] not in allowed})
    if refused:
        raise PruningConfigError(f"pruning type(s) {refused} calibrate on one process's data; under torch.distributed "
                                 f"(world size {world_size()}) the one-shot types that combine their statistics "
                                 f"across ranks are {', '.join(allowed)}")


class _QuietAboutPluginKeys(logging.Filter):
    """INC warns '<key> is not supported for config' for every key it does not know, plugins' keys included."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message == f"{key} is not supported for config" for key in one_shot.PLUGIN_CONFIG_KEYS)


@contextlib.contextmanager
def _inc_quiet_about_plugin_keys():
    inc_logger, quiet = logging.getLogger("neural_compressor"), _QuietAboutPluginKeys()
    inc_logger.addFilter(quiet)
    try:
        yield
    finally:
        inc_logger.removeFilter(quiet)


def prepare_pruning(
    model: torch.nn.Module,
    config: WeightPruningConfig,
    optimizer: torch.optim.Optimizer | None = None,
    dataloader=None,
    loss_func=None,
    device: str | torch.device | None = None,
):
    """Same arguments and return value as `neural_compressor.compression.pruner.prepare_pruning`.

    The config is rebuilt first from a private copy of the caller's values (see `private_copy`): INC writes
    resolved settings into configs and into its own default lists, which would leak into later configs. Entries
    without a pattern get their pruning type's default (`one_shot.default_pattern`). Returns one pruning object,
    or a list when several flows were started; a plugin type's pruning object holds what it found in `.result`
    (see `one_shot_base.PruningResult`).
    """
    if not isinstance(config, WeightPruningConfig):
        raise PruningConfigError(f"config must be a neural_compressor.WeightPruningConfig, got {type(config).__name__}")
    config = private_copy(config)
    _give_type_default_patterns(config)
    settings = settings_per_pruner(config)
    _check_entries(config, settings)

    local_entries = config.pruning_configs or [{}]
    streamed = block_stream(model) is not None
    # INC's drivers need the whole model, and calibrate on this process's data alone
    is_plugin = [one_shot.runs_as_plugin(entry, streamed or world_size() > 1) for entry in settings]
    if streamed:
        _check_streamable(settings, is_plugin)
    if world_size() > 1:
        _check_distributable(settings, is_plugin)
    prunings = []
    if not all(is_plugin):
        # INC's own flows host plugin criteria too (wanda_score, apoz, ...), which read plugin keys
        inc_entries = _with_plugin_keys(config, [e for e, p in zip(local_entries, is_plugin) if not p])
        uses_sparse_gpt = any("gpt" in e["pruning_type"] for e, p in zip(settings, is_plugin) if not p)
        with (sparse_gpt_run(model, dataloader) if uses_sparse_gpt and dataloader is not None
              else contextlib.nullcontext()):
            with _inc_quiet_about_plugin_keys(), inc_defaults_restored():
                started = inc_prepare_pruning(model, _sub_config(config, inc_entries), optimizer, dataloader,
                                              loss_func, device=device)
        started = started if isinstance(started, list) else [started]
        for pruning in started:
            if isinstance(pruning, SparseGPTPruning):
                adapt_on_train_begin(pruning, model)  # INC runs SparseGPT again in on_train_begin(dataloader)
        prunings.extend(started)

    if any(is_plugin):
        plugin_types = {e["pruning_type"] for e, p in zip(settings, is_plugin) if p}
        needing_data = sorted(t for t in plugin_types if one_shot.needs_data(t))
        if dataloader is None and needing_data:
            raise PruningConfigError(f"pruning types {needing_data} prune one-shot from calibration data: pass dataloader=")
        plugin_entries = _with_plugin_keys(config, [e for e, p in zip(local_entries, is_plugin) if p])
        with _inc_quiet_about_plugin_keys(), inc_defaults_restored():
            plugin_infos = process_config(_sub_config(config, plugin_entries))
        by_type: dict[str, list] = {}
        for info in plugin_infos:
            by_type.setdefault(info["pruning_type"], []).append(info)
        for pruning_type, infos in by_type.items():
            prunings.append(one_shot.one_shot_pruning_class(pruning_type)(infos, model, dataloader, loss_func, device))

    return prunings[0] if len(prunings) == 1 else prunings

