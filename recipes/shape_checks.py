"""Checks, before pruning, that a stage's block pattern divides the weight of every layer it selects.

INC 3.7.1 only logs a warning for a layer its pattern does not divide and leaves that layer dense, so a recipe
could report 50% sparsity on paper while whole layers stay untouched. Weights are viewed as INC's patterns view
them: Linear [out, in]; Conv2d [out, kh*kw*in]; Conv1d [out, k*in].
"""

import re

from torch import nn

from inc_plugins import PruningConfigError
from inc_plugins.inc import one_shot
from inc_plugins.inc.config_checks import default_pattern
from inc_plugins.inc.layer_selection import select_layers
from inc_plugins.models.architectures import UnsupportedModelError, adapter_for

from .schema import PruningStage, RecipeError

BLOCK_PATTERN = re.compile(r"^(\d+)x(\d+)$")
N_OF_M_PATTERN = re.compile(r"^(\d+):(\d+)$")
# Types that ignore `pattern`: the structured ones prune whole heads and neurons, the classic types whole channels.
PATTERN_FREE_TYPES = (*one_shot.structured_types(), "network_trimming", "network_slimming", "particle_filter")


def _head_names(model: nn.Module) -> list[str]:
    """Task heads INC and the plugins keep dense: the architecture's, else the last Linear (as INC does)."""
    try:
        return adapter_for(model).head_names(model)
    except UnsupportedModelError:
        return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1:]


def _two_dim_shape(weight) -> tuple[int, int]:
    return weight.shape[0], weight[0].numel()


def check_pattern_fits(model: nn.Module, stage: PruningStage, where: str) -> None:
    """Raises RecipeError naming the first layer whose weight the stage's pattern cannot tile."""
    if stage.pruning_type in PATTERN_FREE_TYPES:
        return
    pattern = stage.pattern or default_pattern(stage.pruning_type)
    block, n_of_m = BLOCK_PATTERN.match(pattern), N_OF_M_PATTERN.match(pattern)
    if block is None and n_of_m is None:
        return  # channel patterns fit any shape
    try:
        layers = select_layers(stage.inc_settings(), model, _head_names(model))
    except PruningConfigError as err:
        raise RecipeError(f"{where}: {err}") from None
    rows, columns = (int(block[1]), int(block[2])) if block else (1, int(n_of_m[2]))
    for name, module in layers.items():
        out_size, in_size = _two_dim_shape(module.weight)
        if out_size % rows or in_size % columns:
            need = (f"{rows} x {columns} blocks need the output size to be a multiple of {rows} and the input "
                    f"size a multiple of {columns}" if block else
                    f"N:M groups run along the input, which needs an input size that is a multiple of {columns}")
            raise RecipeError(
                f"{where}: pattern {pattern!r} does not fit layer {name!r} with weight shape "
                f"{list(module.weight.shape)} ([out, in] = [{out_size}, {in_size}]): {need}. Exclude the layer "
                f"(excluded_op_names) or pick a pattern that divides it"
            )
