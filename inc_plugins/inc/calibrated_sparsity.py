"""The config keys that the block-walking one-shot types share (Wanda, the plugins' SparseGPT, one-shot magnitude):
what to prune, and how the sparsity is spread over the layers (uniform or OWL's outlier-weighted block sparsities);
and DSnoT, for the types whose mask comes from ranking scores (Wanda, magnitude)."""

from __future__ import annotations

import math
import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from inc_plugins.plugin_settings import PluginSettings

from .config_checks import pattern_name

__all__ = ["CalibratedSparsitySettings", "ScoredMaskSettings"]

_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


class CalibratedSparsitySettings(PluginSettings):
    """target_sparsity, pattern ('1x1' or 'N:M') and layer_sparsity (uniform or OWL) of a block-walking type."""

    method: ClassVar[str] = ""  # the method's name in error messages

    target_sparsity: float = Field(ge=0, lt=1, description=(
        "fraction of the weights of each comparison group to prune, in [0, 1); with an N:M pattern exactly N/M"))
    pattern: str = Field("1x1", max_length=50, description=(
        "'1x1' (unstructured) or 'N:M' (N of every M consecutive input weights of a row pruned, e.g. '2:4')"))
    layer_sparsity: Literal["uniform", "owl"] = Field("uniform", description=(
        "'uniform': target_sparsity in every layer; 'owl': outlier-weighted layer-wise sparsity (Yin et al. 2024): "
        "blocks with a larger share of outlier scores are pruned less, the total stays exactly target_sparsity; "
        "only with pattern '1x1'"))
    owl_m: float = Field(5.0, gt=0, description=(
        "OWL: a score is an outlier above owl_m times the mean score of its block (the paper's M)"))
    owl_lambda: float = Field(0.08, ge=0, lt=1, description=(
        "OWL: block sparsities spread over target_sparsity +- owl_lambda (the paper's lambda)"))

    @field_validator("pattern")
    @classmethod
    def _one_shot_pattern(cls, pattern: str) -> str:
        name = pattern_name(pattern)
        nm = _NM_PATTERN.match(name)
        if name != "1x1" and nm is None:
            raise ValueError(
                f"pattern {pattern!r}: {cls.method} supports '1x1' (unstructured) and 'N:M' (N of every M weights "
                f"pruned, e.g. '2:4'). For block patterns such as '4x1', prune while training (pruning_type "
                f"'wanda_score', or INC's 'magnitude' or 'snip_momentum')"
            )
        if nm is not None and not 0 < int(nm.group(1)) < int(nm.group(2)):
            raise ValueError(f"pattern {pattern!r}: N:M prunes N of every M weights, so it needs 0 < N < M")
        return pattern

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N pruned, M) of an N:M pattern; None for '1x1'."""
        match = _NM_PATTERN.match(pattern_name(self.pattern))
        return (int(match.group(1)), int(match.group(2))) if match else None

    @property
    def ranks_globally(self) -> bool:
        """Whether every layer's scores are ranked together (Wanda's comparison_group 'global')."""
        return False

    @property
    def needs_dense_pass(self) -> bool:
        """A global ranking and OWL fix each layer's count from the dense model's scores before pruning."""
        return self.ranks_globally or self.layer_sparsity == "owl"

    @model_validator(mode="after")
    def _nm_sparsity(self) -> CalibratedSparsitySettings:
        nm = self.nm
        if self.layer_sparsity == "owl" and nm is not None:
            raise ValueError(
                f"layer_sparsity 'owl' sets each block's sparsity itself, so it works with pattern '1x1', got pattern "
                f"{self.pattern!r}"
            )
        if nm is not None and not math.isclose(self.target_sparsity, nm[0] / nm[1], abs_tol=1e-9):
            raise ValueError(
                f"pattern {self.pattern!r} prunes exactly {nm[0]} of every {nm[1]} weights (sparsity "
                f"{nm[0] / nm[1]:g}); set target_sparsity to {nm[0] / nm[1]:g}, got {self.target_sparsity!r}"
            )
        return self


class ScoredMaskSettings(CalibratedSparsitySettings):
    """The keys of a type whose mask ranks scores per output row (Wanda's, magnitude's), which DSnoT can refine."""

    dsnot: bool = Field(False, description=(
        "DSnoT (Zhang et al. 2024) after the mask, as INC's prune_wanda(dsnot=True): swap pruned and kept weights "
        "of each row (with an N:M pattern, within a group of M) to bring its expected output back; needs "
        "calibration data; with layer_sparsity 'uniform' (Wanda: comparison_group 'per_output', no use_variant)"))

    @model_validator(mode="after")
    def _dsnot_uniform(self) -> ScoredMaskSettings:
        if self.dsnot and self.layer_sparsity != "uniform":
            raise ValueError(
                f"dsnot swaps weights within each row of a mask with the same count in every row, so it works with "
                f"layer_sparsity 'uniform', got {self.layer_sparsity!r}"
            )
        return self

    @property
    def needs_calibration(self) -> bool:
        """Whether the mask needs calibration data (DSnoT's input statistics, or a dense pass)."""
        return self.dsnot or self.needs_dense_pass
