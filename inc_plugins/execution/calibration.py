"""Sequential, block-by-block calibration for one-shot pruners (Wanda, SparseGPT-like methods).

The model runs on each calibration batch only up to its first block, where the block's inputs are recorded.
From there blocks run one at a time on the recorded inputs, so peak memory stays near the model's size plus
one block's inputs for the calibration batches, never the activations of every layer at once.

    for index, block, inputs in sequential_blocks(model, batches):
        ...  # hook the block's layers, run_block(block, x) for x in inputs, collect statistics
        ...  # prune the block
        # on the next iteration, `inputs` hold the pruned block's outputs
"""

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from inc_plugins.finite_checks import check_batch, check_parameters, check_tensor
from inc_plugins.models.architectures import adapter_for
from inc_plugins.models.batch_inputs import model_call

CALIBRATION = "block-by-block calibration"


@dataclass
class BlockInput:
    """One batch's recorded call of a block.

    `hidden_states`: [batch, seq, hidden] for transformers, [batch, channels, height, width] for CNNs.
    `args`/`kwargs`: everything else the model passed to the block (attention mask, rotary
    `position_embeddings`, `position_ids`, ...), shared unchanged by every block. When replayed, hidden
    states go first, positionally, as every supported block's `forward` takes them.
    """

    hidden_states: Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _StopForward(Exception):
    """Raised by the capture hook: nothing past the first block's inputs is needed."""


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout would make recorded inputs and recomputed outputs random."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _module_name(model: nn.Module, module: nn.Module, fallback: str) -> str:
    return next((name for name, candidate in model.named_modules() if candidate is module), fallback)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: Sequence[nn.Module], batches: Iterable[Any], during: str = CALIBRATION
) -> list[BlockInput]:
    """Record the inputs of `blocks[0]` for every batch, running the model only up to that block.

    Returns one BlockInput per batch. Raises ValueError when `batches` is empty or when the model
    finishes a forward pass without calling `blocks[0]`; NonFiniteError when a batch, or the hidden states
    it gives `blocks[0]`, hold NaN or Inf (`during` says who calibrates, for the message).
    """
    captured: list[BlockInput] = []
    first_block = _module_name(model, blocks[0], "blocks[0]")

    def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        if args:
            hidden_states, args = args[0], args[1:]
        else:
            hidden_states = kwargs.pop("hidden_states")
        captured.append(BlockInput(hidden_states, tuple(args), kwargs))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with _eval_mode(model):
            for index, batch in enumerate(batches):
                check_batch(batch, index, during)
                args, kwargs = model_call(model, batch)
                try:
                    model(*args, **kwargs)
                except _StopForward:
                    check_tensor(captured[-1].hidden_states, first_block, "input activation",
                                 f"{during}, block 0, batch {index}")
                    continue
                raise ValueError(
                    f"{type(model).__name__} finished a forward pass without calling blocks[0] "
                    f"({type(blocks[0]).__name__}): are these blocks part of this model?"
                )
    finally:
        handle.remove()
    if not captured:
        raise ValueError("cannot calibrate: the calibration dataloader yielded no batches")
    return captured


def first_output(output: Tensor | tuple[Any, ...]) -> Tensor:
    """The hidden states a block returned: the output itself when it is a Tensor (transformers 5 BERT,
    DistilBERT, Llama, OPT and GPT-2 layers, CNN blocks) or its first element when it is a tuple
    (MPNet layers in transformers 5, most layers in 4.x)."""
    return output if isinstance(output, Tensor) else output[0]


@torch.no_grad()
def run_block(block: nn.Module, block_input: BlockInput) -> Tensor:
    """Run `block` on one recorded input and return its output hidden states (same shape as the input's).

    Runs without autograd, so forward hooks may read activations without keeping a graph alive.
    """
    return first_output(block(block_input.hidden_states, *block_input.args, **block_input.kwargs))


def advance_inputs(block: nn.Module, inputs: list[BlockInput]) -> None:
    """Replace each input's hidden states, in place, by `block`'s output on it: the next block's inputs.

    Each batch's old hidden states are released as soon as its replacement exists.
    """
    for block_input in inputs:
        block_input.hidden_states = run_block(block, block_input)


def sequential_blocks(
    model: nn.Module, batches: Iterable[Any], blocks: Sequence[nn.Module] | None = None, during: str = CALIBRATION
) -> Iterator[tuple[int, nn.Module, list[BlockInput]]]:
    """Walk the model's blocks in order, yielding (index, block, inputs) with the block's recorded inputs.

    `blocks` defaults to the ones `adapter_for(model)` finds. When the caller asks for the next block,
    the current one is re-run (with whatever weights the caller left it) and its outputs replace the hidden
    states in `inputs`, which is the same list every time: keep no references to earlier hidden states.
    The model stays in eval mode while the walk is in progress.

    Non-finite values stop the walk with NonFiniteError (`during` names the caller in its message): the model's
    parameters are checked before any block runs, each calibration batch and the first block's inputs as they
    are captured, and each block's outputs as they are recomputed, so the error names where NaN or Inf first
    appear (a weight, the data, or the block whose computation overflowed).
    """
    if blocks is None:
        _, blocks = adapter_for(model).blocks(model)
    check_parameters(model, during)
    names = {id(module): name for name, module in model.named_modules()}
    with _eval_mode(model):
        inputs = capture_block_inputs(model, blocks, batches, during)
        for index, block in enumerate(blocks):
            yield index, block, inputs
            if index < len(blocks) - 1:
                advance_inputs(block, inputs)
                name = names.get(id(block), f"block {index}")
                for batch_index, block_input in enumerate(inputs):
                    check_tensor(block_input.hidden_states, name, "output activation",
                                 f"{during}, block {index}, batch {batch_index}")
