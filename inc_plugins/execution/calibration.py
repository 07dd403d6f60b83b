"""Sequential, block-by-block calibration for one-shot pruners (Wanda, SparseGPT-like methods).

The model runs on each calibration batch only up to its first block, where the block's inputs are recorded.
From there blocks run one at a time on the recorded inputs, so peak memory stays near the model's size plus
one block's inputs for the calibration batches, never the activations of every layer at once.

    for index, block, inputs in sequential_blocks(model, batches):
        ...  # hook the block's layers, run_block(block, x) for x in inputs, collect statistics
        ...  # prune the block
        # on the next iteration, `inputs` hold the pruned block's outputs

With `merge_tokens`, consecutive batches that share every other argument of the block call (same sequence length,
the same attention mask and position embeddings) run through each block as one call of up to that many tokens:
one batch of 128 tokens leaves a small model's matrix products too short to keep the cores busy (a SmolLM2-135M
block: 10.1 ms per 128-token window alone, 6.2 ms in calls of 8 windows, identical outputs). Statistics that depend
on how the data was batched read `BlockInput.batch_sizes` to split a merged call back into its batches.

A streamed model with a memory budget keeps the recorded inputs past its allowance in a file (`activation_spill`):
then memory holds one batch's hidden states at a time, however many calibration batches there are.
"""

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from inc_plugins.finite_checks import check_batch, check_parameters, check_tensor
from inc_plugins.models.architectures import adapter_for
from inc_plugins.models.batch_inputs import model_call

from .activation_spill import ActivationSpill, SpilledTensor
from .streamed_model import activation_spill, resident_block

CALIBRATION = "block-by-block calibration"

# Tokens per merged block call for pruners that merge batches (see the module docstring): from 1024 on, a SmolLM2
# block's products run as fast per token as they get on 2 cores, while its activations stay a few MB.
MERGE_TOKENS = 1024


class BlockInput:
    """One batch's recorded call of a block.

    `hidden_states`: [batch, seq, hidden] for transformers, [batch, channels, height, width] for CNNs.
    `args`/`kwargs`: everything else the model passed to the block (attention mask, rotary
    `position_embeddings`, `position_ids`, ...), shared unchanged by every block. When replayed, hidden
    states go first, positionally, as every supported block's `forward` takes them.
    `batch_sizes`: the sizes of the calibration batches concatenated, in order, along dim 0 of `hidden_states`
    (`merged_inputs`); empty for one batch as it was captured.

    After `spill_into(spill)` the hidden states live in the spill's file: reading `hidden_states` reads them into a
    new tensor, assigning it writes them back (`activation_spill`).
    """

    def __init__(self, hidden_states: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any],
                 batch_sizes: tuple[int, ...] = ()):
        self._hidden_states: Tensor | None = hidden_states
        self._spilled: SpilledTensor | None = None
        self.args, self.kwargs, self.batch_sizes = args, kwargs, batch_sizes

    @property
    def hidden_states(self) -> Tensor:
        return self._hidden_states if self._spilled is None else self._spilled.read()

    @hidden_states.setter
    def hidden_states(self, value: Tensor) -> None:
        if self._spilled is None:
            self._hidden_states = value
        else:
            self._spilled.write(value)

    def spill_into(self, spill: ActivationSpill) -> None:
        if self._spilled is None:
            self._spilled, self._hidden_states = spill.store(self._hidden_states), None


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
def _captured(model: nn.Module, blocks: Sequence[nn.Module], batches: Iterable[Any], during: str
              ) -> Iterator[BlockInput]:
    """Each batch's recorded input of `blocks[0]`, as the batch is read (see `capture_block_inputs`)."""
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
                    yield captured.pop()
                    continue
                raise ValueError(
                    f"{type(model).__name__} finished a forward pass without calling blocks[0] "
                    f"({type(blocks[0]).__name__}): are these blocks part of this model?"
                )
    finally:
        handle.remove()


def _nonempty(inputs: list[BlockInput]) -> list[BlockInput]:
    if not inputs:
        raise ValueError("cannot calibrate: the calibration dataloader yielded no batches")
    return inputs


def capture_block_inputs(
    model: nn.Module, blocks: Sequence[nn.Module], batches: Iterable[Any], during: str = CALIBRATION
) -> list[BlockInput]:
    """Record the inputs of `blocks[0]` for every batch, running the model only up to that block.

    Returns one BlockInput per batch. Raises ValueError when `batches` is empty or when the model
    finishes a forward pass without calling `blocks[0]`; NonFiniteError when a batch, or the hidden states
    it gives `blocks[0]`, hold NaN or Inf (`during` says who calibrates, for the message).
    """
    return _nonempty(list(_captured(model, blocks, batches, during)))


def _same_broadcast_arguments(first: Any, other: Any) -> bool:
    """True if two block-call arguments are equal and any tensor among them has batch dimension 1 (or none), so
    one copy serves a call on the two batches concatenated."""
    if isinstance(first, Tensor) or isinstance(other, Tensor):
        return (isinstance(first, Tensor) and isinstance(other, Tensor) and first.dim() == other.dim()
                and (first.dim() == 0 or first.shape[0] == 1) and (first is other or torch.equal(first, other)))
    if isinstance(first, (tuple, list)):
        return (type(first) is type(other) and len(first) == len(other)
                and all(_same_broadcast_arguments(a, b) for a, b in zip(first, other)))
    if isinstance(first, dict):
        return (isinstance(other, dict) and first.keys() == other.keys()
                and all(_same_broadcast_arguments(first[key], other[key]) for key in first))
    return type(first) is type(other) and first == other


def _mergeable(first: BlockInput, other: BlockInput) -> bool:
    a, b = first.hidden_states, other.hidden_states
    return (a.dim() == 3 and b.shape[1:] == a.shape[1:] and b.dtype == a.dtype and b.device == a.device
            and _same_broadcast_arguments((first.args, first.kwargs), (other.args, other.kwargs)))


def _tokens(block_input: BlockInput) -> int:
    return block_input.hidden_states.shape[0] * block_input.hidden_states.shape[1]


def _merged(inputs: Iterable[BlockInput], max_tokens: int) -> Iterator[BlockInput]:
    """`merged_inputs`, each merged input yielded as soon as its run of batches ends."""
    group: list[BlockInput] = []
    for block_input in inputs:
        fits = group and sum(map(_tokens, group)) + _tokens(block_input) <= max_tokens
        if fits and _mergeable(group[0], block_input):
            group.append(block_input)
            continue
        if group:
            yield _concatenated(group)
        group = [block_input]
    if group:
        yield _concatenated(group)


def _concatenated(group: list[BlockInput]) -> BlockInput:
    if len(group) == 1:
        return group[0]
    return BlockInput(torch.cat([x.hidden_states for x in group]), group[0].args, group[0].kwargs,
                      tuple(x.hidden_states.shape[0] for x in group))


def merged_inputs(inputs: Iterable[BlockInput], max_tokens: int) -> list[BlockInput]:
    """`inputs` with runs of consecutive mergeable batches concatenated into calls of at most `max_tokens` tokens.

    Mergeable: hidden states `[batch, seq, hidden]` of one shape past the batch dimension, and every other argument
    equal, its tensors with batch dimension 1 (they broadcast over the merged batch). A batch of `max_tokens` or
    more stays alone. The merged input's `batch_sizes` lists the batches it holds.
    """
    return list(_merged(inputs, max_tokens))


def split_batches(rows: Tensor, num_samples: int, batch_sizes: tuple[int, ...]) -> list[tuple[Tensor, int]]:
    """A layer's input rows from one block call, as (rows, samples) per calibration batch of the call.

    `rows` `[tokens, features]` hold the call's samples one after another and `num_samples` is how many the layer
    counted (`input_samples`); `batch_sizes` is the call's `BlockInput.batch_sizes`. A layer that saw its input
    flattened to 2-D counts one sample per call, and so one per batch here, as it would have unmerged.
    """
    if len(batch_sizes) <= 1:
        return [(rows, num_samples)]
    total = sum(batch_sizes)
    if rows.shape[0] % total:
        raise RuntimeError(f"{rows.shape[0]} input rows cannot be split into the {total} samples of a merged call")
    per_sample = rows.shape[0] // total
    counts = batch_sizes if num_samples == total else (num_samples,) * len(batch_sizes)
    return list(zip(rows.split([size * per_sample for size in batch_sizes]), counts))


def _batch_labels(inputs: list[BlockInput]) -> list[str]:
    """Per input, 'batch 3' or, for a merged call, 'batches 3-10' (indices of the calibration batches)."""
    labels, first = [], 0
    for block_input in inputs:
        count = len(block_input.batch_sizes) or 1
        labels.append(f"batch {first}" if count == 1 else f"batches {first}-{first + count - 1}")
        first += count
    return labels


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


def sequential_blocks(
    model: nn.Module, batches: Iterable[Any], blocks: Sequence[nn.Module] | None = None, during: str = CALIBRATION,
    merge_tokens: int = 0,
) -> Iterator[tuple[int, nn.Module, list[BlockInput]]]:
    """Walk the model's blocks in order, yielding (index, block, inputs) with the block's recorded inputs.

    `blocks` defaults to the ones `adapter_for(model)` finds. When the caller asks for the next block,
    the current one is re-run (with whatever weights the caller left it) and its outputs replace the hidden
    states in `inputs`, which is the same list every time: keep no references to earlier hidden states.
    The model stays in eval mode while the walk is in progress. A streamed model (``streamed_model``) holds each
    block's weights only while the walk is at it: from the yield until the next block's inputs are computed.

    Non-finite values stop the walk with NonFiniteError (`during` names the caller in its message): the model's
    parameters are checked before any block runs, each calibration batch and the first block's inputs as they
    are captured, and each block's outputs as they are recomputed, so the error names where NaN or Inf first
    appear (a weight, the data, or the block whose computation overflowed).

    `merge_tokens` > 0: the inputs are `merged_inputs(captured, merge_tokens)` (see the module docstring).

    A streamed model with a memory budget keeps the inputs past its activation allowance in a file
    (`activation_spill`): each is read when a block runs on it, so memory holds one batch's hidden states at a time.
    """
    if blocks is None:
        _, blocks = adapter_for(model).blocks(model)
    check_parameters(model, during)
    names = {id(module): name for name, module in model.named_modules()}
    spill = activation_spill(model)
    try:
        with _eval_mode(model):
            captured = _captured(model, blocks, batches, during)
            inputs = []
            for block_input in _merged(captured, merge_tokens) if merge_tokens > 0 else captured:
                if spill is not None:
                    spill.hold(block_input)
                inputs.append(block_input)
            labels = _batch_labels(_nonempty(inputs))
            for index, block in enumerate(blocks):
                with resident_block(model, index):
                    yield index, block, inputs
                    if index < len(blocks) - 1:  # the next block's inputs, each batch's replacing its own
                        name = names.get(id(block), f"block {index}")
                        for block_input, label in zip(inputs, labels):
                            output = run_block(block, block_input)
                            check_tensor(output, name, "output activation", f"{during}, block {index}, {label}")
                            block_input.hidden_states = output
    finally:
        if spill is not None:
            spill.close()
