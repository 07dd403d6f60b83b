"""INC plugins: extra pruners for Intel Neural Compressor 3.7's pruning system.

Importing the package checks the INC version, then registers the project's pruners and criteria into INC's
registries (``inc.registry``), so `WeightPruningConfig(pruning_type=...)` reaches them through INC's usual paths, and
the slimmed model types into transformers' Auto classes (``models.slimmed_auto``), so `from_pretrained` loads a
slimmed model.
"""

import warnings

from .inc.compat import require_supported_inc

require_supported_inc()
with warnings.catch_warnings():
    # INC 3.7.1 imports pkg_resources at start-up; the deprecation notice says nothing actionable to users.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    import neural_compressor  # noqa: F401

from .finite_checks import NonFiniteError  # noqa: E402
from .inc import registry as _registry  # noqa: E402,F401  (registers every plugin type, criterion and regularizer)
from .inc.checkpoint_pruning import CheckpointPruning, prune_checkpoint  # noqa: E402
from .inc.config import pruning_config  # noqa: E402
from .inc.config_checks import PruningConfigError, known_pruning_types  # noqa: E402
from .inc.entry import prepare_pruning  # noqa: E402
from .inc.lifecycle import complete_pruning  # noqa: E402
from .inc.one_shot import is_one_shot, plugin_settings_model, register_one_shot_pruning  # noqa: E402
from .inc.one_shot_base import OneShotPruning, PruningResult, slim  # noqa: E402
from .inc.trainer_callback import PruningCallback  # noqa: E402
from .models.safetensors_checkpoint import CheckpointError  # noqa: E402
from .models.slimmed_auto import register_slimmed_classes  # noqa: E402
from .plugin_settings import PluginSettings  # noqa: E402

register_slimmed_classes()

__all__ = [
    "prepare_pruning",
    "prune_checkpoint",
    "CheckpointPruning",
    "CheckpointError",
    "complete_pruning",
    "PruningCallback",
    "slim",
    "is_one_shot",
    "pruning_config",
    "known_pruning_types",
    "plugin_settings_model",
    "register_one_shot_pruning",
    "OneShotPruning",
    "PluginSettings",
    "PruningResult",
    "PruningConfigError",
    "NonFiniteError",
]
