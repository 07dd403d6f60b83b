"""Particle-filter structured pruning (Anwar et al. 2017) as the one-shot INC pruning type "particle_filter".

Searches structured masks of each selected Conv2d, one layer at a time (``execution.particle_filter_search``),
scoring candidates by the misclassification rate on the given **labelled** batches (``(inputs, labels)`` pairs or
dicts with ``labels``). ``pattern: "1xchannel"`` means ``granularity: "channel"`` (output feature maps; a following
BN channel is silenced too); ``pattern: "1x1"`` goes with ``granularity: "kernel"`` (whole kh x kw kernels) or
``"intra_kernel"`` (strided kernel positions, ``stride`` key). The other keys are ``ParticleFilterSettings``'
fields. ``pruning.result.searches`` is {layer: SearchResult}. Non-Conv2d selected layers are skipped with a
warning. Cost: about ``num_particles * (iterations + 1)`` evaluations of the batches per layer (fewer when particles
repeat: each distinct pattern is evaluated once).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from torch import nn

from inc_plugins.algorithms.particle_filter import ParticleFilterSettings as SearchSettings
from inc_plugins.algorithms.particle_filter import SearchResult
from inc_plugins.execution.misclassification import split_labelled_batch
from inc_plugins.execution.particle_filter_search import particle_filter_prune
from inc_plugins.models.cnn_structure import conv_bn_pairs
from inc_plugins.plugin_settings import PluginSettings

from .config_checks import PruningConfigError, pattern_name
from .layer_selection import EXAMPLE_NAMES
from .one_shot_base import OneShotPruner, OneShotPruning, PruningResult

__all__ = ["ParticleFilterPruner", "ParticleFilterPruning", "ParticleFilterResult", "ParticleFilterSettings"]

logger = logging.getLogger(__name__)


class ParticleFilterSettings(PluginSettings):
    """The keys of a ``pruning_type="particle_filter"`` config entry."""

    target_sparsity: float = Field(ge=0, lt=1, description=(
        "fraction of each layer's structures (channels, kernels or kernel positions) to prune, in [0, 1)"))
    pattern: str = Field("1xchannel", max_length=50, description=(
        "'1xchannel' with granularity 'channel', '1x1' with 'kernel' or 'intra_kernel'"))
    granularity: Literal["channel", "kernel", "intra_kernel"] | None = Field(None, description=(
        "what a particle prunes: output 'channel's, whole 'kernel's, or strided 'intra_kernel' positions; "
        "null: 'channel' (needs pattern '1xchannel')"))
    # each particle of each iteration is one evaluation of the model on the calibration batches
    num_particles: Annotated[int, Field(ge=1, le=10_000)] = Field(16, description="candidate masks per iteration")
    iterations: Annotated[int, Field(ge=1, le=10_000)] = Field(6, description="resample-and-mutate rounds per layer")
    weighting: Literal["linear", "exp"] = Field("linear", description=(
        "particle weight from its error: 'linear' (1 - error) or 'exp' (exp(-error / temperature))"))
    temperature: Annotated[float, Field(gt=0, le=1e6)] = Field(0.05, description="the temperature of 'exp' weighting")
    mutation_rate: Annotated[float, Field(ge=0, le=1)] = Field(0.1, description=(
        "fraction of a resampled particle's pruned structures moved when it is perturbed (at least one move)"))
    stride: Annotated[int, Field(ge=2, le=1024)] = Field(2, description=(
        "'intra_kernel': kernel positions offset, offset + stride, ... are kept"))
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = Field(0, description="seed of the random search")
    keep_best: bool = Field(True, description="elitism: each generation's best particle survives unperturbed")

    @model_validator(mode="after")
    def _granularity_matches_pattern(self) -> ParticleFilterSettings:
        pattern = pattern_name(self.pattern)
        if self.granularity is None:
            if pattern != "1xchannel":
                raise ValueError(
                    f"particle_filter with pattern {self.pattern!r}: set granularity to 'kernel' or 'intra_kernel' "
                    f"(with pattern '1x1'), or use pattern '1xchannel' for channel-wise pruning"
                )
            return self
        expected = "1xchannel" if self.granularity == "channel" else "1x1"
        if pattern != expected:
            raise ValueError(
                f"particle_filter granularity {self.granularity!r} goes with pattern {expected!r}, got {self.pattern!r}"
            )
        return self

    @property
    def search_granularity(self) -> str:
        return self.granularity or "channel"

    def search_settings(self) -> SearchSettings:
        """The search's own settings (``algorithms.particle_filter.ParticleFilterSettings``)."""
        return SearchSettings(
            num_particles=self.num_particles, iterations=self.iterations, weighting=self.weighting,
            temperature=self.temperature, mutation_rate=self.mutation_rate, stride=self.stride, seed=self.seed,
            keep_best=self.keep_best,
        )


@dataclasses.dataclass(frozen=True)
class ParticleFilterResult(PruningResult):
    """``searches``: {layer: SearchResult} with the chosen mask, its error and the search's trace."""

    searches: dict[str, SearchResult]


class ParticleFilterPruner(OneShotPruner):
    """INC's view of a particle_filter entry (``PRUNERS["pt_particle_filter"]``): the chosen masks."""


class ParticleFilterPruning(OneShotPruning):
    """One-shot particle-filter structured pruning of Conv2d layers (see the module doc); needs labelled batches."""

    pruner_class = ParticleFilterPruner
    result_class = ParticleFilterResult

    def layers_to_prune(self, index: int, info: Mapping[str, Any], settings: ParticleFilterSettings,
                        selected: dict[str, nn.Module]) -> dict[str, nn.Module]:
        convs = {name: m for name, m in selected.items() if isinstance(m, nn.Conv2d) and m.groups == 1}
        others = [name for name in selected if name not in convs]
        if not convs:
            raise PruningConfigError(
                f"particle_filter prunes Conv2d layers (groups=1); config entry {index} selects none of them: "
                f"{others[:EXAMPLE_NAMES]}"
            )
        if others:
            logger.warning("particle_filter prunes Conv2d layers only; these selected layers stay dense: %s", others)
        return convs

    def prune(self, dataloader, loss_func) -> dict[str, Any]:
        batches = list(dataloader)
        if not batches:
            raise PruningConfigError("particle_filter scores masks on labelled batches: the dataloader is empty")
        try:
            for batch in batches:
                split_labelled_batch(batch)
        except ValueError as error:
            raise PruningConfigError(f"particle_filter scores masks by misclassification rate: {error}") from error
        pairs = conv_bn_pairs(self._model)
        searches: dict[str, SearchResult] = {}
        for pruner, settings in zip(self.pruners, self.settings):
            companions = {name: self._model.get_submodule(pairs[name]) for name in pruner.modules if name in pairs}
            results = particle_filter_prune(
                self._model, pruner.modules, batches, settings.target_sparsity, settings.search_granularity,
                settings.search_settings(), companions,
            )
            for name, result in results.items():
                pruner.masks[name] = result.mask.to(pruner.modules[name].weight.device)
                logger.info("particle_filter: %s sparsity %.3f, error %.4f after %d evaluations",
                            name, result.sparsity, result.error, result.evaluations)
            searches.update(results)
        return {"searches": searches}
