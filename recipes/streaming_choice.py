"""Whether a causal-LM recipe streams its model (`execution:`), and the checkpoint a streamed run is at.

A streamed run never holds the model: it is built on the meta device (`inc_plugins.execution.streamed_model`), each
pruning stage writes a new checkpoint shard by shard into the run's staging directory, and evaluation reads the
blocks of the current checkpoint as each forward pass reaches them.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from inc_plugins.execution.streamed_model import MemoryBudgetError, block_stream, open_streamed_causal_lm
from inc_plugins.models.safetensors_checkpoint import CheckpointError, CheckpointReader
from inc_plugins.perf.memory import available_bytes, gib

from .schema import CausalLMRecipe, Execution, RecipeError

def _budget(execution: Execution) -> int:
    return int(execution.memory_budget) if execution.memory_budget is not None else available_bytes()


def _in_memory_bytes(reader: CheckpointReader, float32: bool) -> tuple[int, str]:
    """(bytes, dtype name) of the model in memory: its weights in the dtype they are stored in, or in float32."""
    dtype = torch.float32 if float32 else reader.stored_dtype()
    elements = sum(torch.Size(reader.shape(name)).numel() for name in reader.names)
    return elements * dtype.itemsize, str(dtype).removeprefix("torch.")


def streams(recipe: CausalLMRecipe) -> bool:
    """Whether the recipe's model streams: `execution.mode` says so, or `auto` and the model of `model.path` would not
    fit the memory budget in memory (assets are small and load in memory). RecipeError when `auto` would stream a
    recipe with a step that needs the whole model."""
    mode = recipe.execution.mode
    if mode != "auto" or recipe.model.path is None:
        return mode == "streaming"
    try:
        reader = CheckpointReader(recipe.model.path)
    except CheckpointError:
        return False  # not a safetensors checkpoint: the in-memory loader reports what is wrong with it
    size, dtype = _in_memory_bytes(reader, recipe.takes_gradients())
    budget = _budget(recipe.execution)
    if size <= budget:
        return False
    refused = recipe.streaming_refusals()
    if refused:
        raise RecipeError(f"the model needs {gib(size)} in memory ({dtype}), more than the memory budget "
                          f"{gib(budget)}, so execution 'auto' would stream it, but streaming cannot run: "
                          f"{'; '.join(refused)}")
    print(f"  streaming the model: {gib(size)} in memory ({dtype}) exceeds the memory budget {gib(budget)}")
    return True


@dataclass(frozen=True)
class StreamedCheckpoint:
    """The checkpoint a streamed run is at: the source, then each pruning stage's output (`stages` applied)."""

    directory: Path
    stages: int
    budget: int
    dtype: str
    blocks: int
    held_bytes: int  # weights outside the blocks plus the largest block

    def describe(self) -> dict:
        return {"mode": "streaming", "memory_budget_bytes": self.budget, "dtype": self.dtype, "blocks": self.blocks,
                "weights_held_at_once_bytes": self.held_bytes}


def open_streamed(directory: Path, execution: Execution, stages: int = 0) -> tuple[torch.nn.Module, StreamedCheckpoint]:
    """The model of checkpoint `directory` on the meta device, its blocks streamed. RecipeError for a checkpoint that
    cannot be read, or a memory budget smaller than the weights streaming holds at once."""
    try:
        model = open_streamed_causal_lm(directory)
    except CheckpointError as err:
        raise RecipeError(str(err)) from None
    stream, budget = block_stream(model), _budget(execution)
    try:
        stream.check_budget(budget)
    except MemoryBudgetError as err:
        raise RecipeError(f"execution.memory_budget: {err}") from None
    dtype = str(model.config.dtype).removeprefix("torch.")
    return model, StreamedCheckpoint(Path(directory), stages, budget, dtype, len(stream.blocks), stream.held_bytes)
