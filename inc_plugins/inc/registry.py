"""Everything the plugins add to INC 3.7.1's registries, in one place. ``import inc_plugins`` runs it.

A new one-shot pruning type is one file in this package (a ``PluginSettings`` model and a ``OneShotPruning``
subclass with a ``prune`` method) and one ``register_one_shot_pruning`` line below. Names must avoid the
substrings INC dispatches on ("gpt", "retrain", "block", "free", "progressive"), unless the type is one of INC's own
that the plugins also implement (`inc_builtin=True`: "sparse_gpt"). A training-aware type is an INC pruner class
and a settings model, registered with ``register_training_aware_pruning``.
"""

from neural_compressor.compression.pruner.criteria import register_criterion
from neural_compressor.compression.pruner.regs import register_reg

from .apoz_criterion import APoZCriterion
from .flap import FlapPruning, FlapSettings
from .lottery_ticket_pruner import LotteryTicketPruner, LotteryTicketSettings
from .mask_search import MaskSearchPruning, MaskSearchSettings
from .network_slimming import BNL1Regularizer, NetworkSlimmingPruning, NetworkSlimmingSettings
from .network_trimming import NetworkTrimmingPruning, NetworkTrimmingSettings
from .one_shot import register_one_shot_pruning, register_training_aware_pruning
from .one_shot_magnitude import MagnitudeSettings, OneShotMagnitudePruning
from .particle_filter import ParticleFilterPruning, ParticleFilterSettings
from .sparse_gpt import PluginSparseGPTPruning, SparseGPTSettings
from .structured_magnitude import StructuredMagnitudePruning, StructuredMagnitudeSettings
from .wanda import WandaPruning, WandaSettings
from .wanda_sp import WandaSpPruning, WandaSpSettings
from .wanda_score_criterion import WandaScoreCriterion

# one-shot types: PRUNINGS["<type>_pruning"], PRUNERS["pt_<type>"], routed by inc_plugins.prepare_pruning
register_one_shot_pruning("wanda", settings=WandaSettings, default_pattern="1x1")(WandaPruning)
register_one_shot_pruning("one_shot_magnitude", settings=MagnitudeSettings, needs_data=False,
                          default_pattern="1x1")(OneShotMagnitudePruning)
# INC's own driver runs sparse_gpt entries unless they set layer_sparsity / owl_m / owl_lambda (see inc/sparse_gpt.py)
register_one_shot_pruning("sparse_gpt", settings=SparseGPTSettings, default_pattern="1x1",
                          inc_builtin=True)(PluginSparseGPTPruning)
register_one_shot_pruning("mask_search", settings=MaskSearchSettings, default_pattern="1xchannel")(MaskSearchPruning)
# whole heads (key/value groups) and FFN neurons to a FLOPs target, results that inc_plugins.slim takes
register_one_shot_pruning("flap", settings=FlapSettings, default_pattern="1xchannel")(FlapPruning)
register_one_shot_pruning("wanda_sp", settings=WandaSpSettings, default_pattern="1xchannel")(WandaSpPruning)
register_one_shot_pruning("structured_magnitude", settings=StructuredMagnitudeSettings, needs_data=False,
                          default_pattern="1xchannel")(StructuredMagnitudePruning)
register_one_shot_pruning("network_trimming", settings=NetworkTrimmingSettings,
                          default_pattern="1xchannel")(NetworkTrimmingPruning)
register_one_shot_pruning("network_slimming", settings=NetworkSlimmingSettings, needs_data=False,
                          default_pattern="1xchannel")(NetworkSlimmingPruning)
# the default granularity is "channel"; "kernel" / "intra_kernel" need pattern "1x1" set explicitly
register_one_shot_pruning("particle_filter", settings=ParticleFilterSettings,
                          default_pattern="1xchannel")(ParticleFilterPruning)

# training-aware types: PRUNERS["pt_<type>"], built by INC's training-aware flow (prepare_pruning(..., optimizer=...))
register_training_aware_pruning("lottery_ticket", settings=LotteryTicketSettings,
                                default_pattern="1x1")(LotteryTicketPruner)

# criteria and regularizers for INC's training-aware flow (prepare_pruning(..., optimizer=...))
register_criterion("wanda_score")(WandaScoreCriterion)
register_criterion("apoz")(APoZCriterion)
register_reg("bn_l1")(BNL1Regularizer)
