"""INC plugins: extra pruners for Intel Neural Compressor 3.7's pruning system.

Importing the package checks the INC version, then registers the project's pruners and criteria into INC's
registries, so `WeightPruningConfig(pruning_type=...)` reaches them through INC's usual paths.
"""

import warnings

from .inc.compat import require_supported_inc

require_supported_inc()
with warnings.catch_warnings():
    # INC 3.7.1 imports pkg_resources at start-up; the deprecation notice says nothing actionable to users.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    import neural_compressor  # noqa: F401

from .inc.config import pruning_config  # noqa: E402
from .inc.config_checks import PruningConfigError, known_pruning_types  # noqa: E402
from .finite_checks import NonFiniteError  # noqa: E402
from .inc.entry import prepare_pruning  # noqa: E402
from .inc.mask_search import slim  # noqa: E402  (registers mask_search; slim(model) slims a mask_search-pruned model)
from .inc import wanda as _wanda  # noqa: E402,F401  (registers pt_wanda, wanda_pruning, wanda_score)
from .inc import classic as _classic  # noqa: E402,F401  (registers network_trimming, network_slimming, particle_filter, apoz, bn_l1)
from .inc.lifecycle import complete_pruning  # noqa: E402
from .inc.one_shot import is_one_shot  # noqa: E402

__all__ = [
    "prepare_pruning",
    "complete_pruning",
    "slim",
    "is_one_shot",
    "pruning_config",
    "known_pruning_types",
    "PruningConfigError",
    "NonFiniteError",
]
