"""A decoder whose blocks live in a safetensors checkpoint and are loaded one at a time.

``open_streamed_causal_lm(directory)`` builds the model on the meta device (shapes, no memory), loads what lies
outside its blocks (embeddings, final norm, LM head: a few hundred MB at 7B) and attaches a ``BlockStream``. The block
walk of ``execution.calibration`` and the one-shot pruners then hold one block at a time:

    with resident_block(model, i):   # block i's tensors read from the shards, checked for NaN/Inf
        ...                          # calibrate, prune
        write_block(model, i)        # the pruned block written as a shard of the output checkpoint
    # block i's parameters are meta tensors again

On a model in memory both calls do nothing, so a pruner's code is the same either way. ``BlockStream.finish`` copies
the blocks nobody wrote (no selected layer) and writes the index, config and tokenizer files: the output directory is
a checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads. Weights stay in the dtype they are stored in;
statistics and solves run in float32 inside the algorithms.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from inc_plugins.finite_checks import check_parameters
from inc_plugins.models.architectures import adapter_for
from inc_plugins.models.safetensors_checkpoint import (
    INDEX_FILE,
    OTHER_WEIGHT_SUFFIXES,
    CheckpointError,
    CheckpointReader,
    ShardedCheckpointWriter,
)
from inc_plugins.perf.memory import gib

from .activation_spill import ActivationSpill
from .distributed import gathered_in_rank_order, is_writer, rank

__all__ = ["STREAMED_MODEL_TYPES", "BlockStream", "MemoryBudgetError", "activation_spill", "block_stream",
           "loading_each_block", "open_streamed_causal_lm", "parameter_value", "resident_block", "write_block"]

logger = logging.getLogger(__name__)

STREAMED_MODEL_TYPES = ("llama", "mistral", "qwen2", "opt", "gpt2")
_STREAM_ATTRIBUTE = "_inc_plugins_block_stream"
SPILL_PREFIX = "activations-"  # calibration activations kept in the output's staging directory while a walk runs


class MemoryBudgetError(ValueError):
    """A memory budget smaller than the weights streaming must hold at once."""


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def _return_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``). A block's activations and
    intermediates (tens of MB each at 7B) come from the heap, and the pages freed between long-lived small
    allocations otherwise stay resident, so the process grew block after block."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)


def _checkpoint_keys(model: nn.Module, reader: CheckpointReader, tied: set[str]) -> dict[str, str]:
    """{parameter name: its tensor's name in the checkpoint}. Checkpoints saved from a base model (e.g. OPT's
    ``decoder.layers...``, GPT-2's ``h.0...``) name tensors without the causal-LM wrapper's prefix."""
    prefix = f"{model.base_model_prefix}."
    keys, missing = {}, []
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name in tied:
            continue
        key = name if name in reader else name.removeprefix(prefix) if name.removeprefix(prefix) in reader else None
        if key is None:
            missing.append(name)
            continue
        if reader.shape(key) != tuple(parameter.shape):
            raise CheckpointError(
                f"tensor {key!r} in {str(reader.directory / reader.shard_of(key))!r} has shape {list(reader.shape(key))}"
                f", but config.json gives {list(parameter.shape)}: the shards and the config disagree"
            )
        keys[name] = key
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"the checkpoint in {str(reader.directory)!r} lacks {len(missing)} tensor(s) the model "
                              f"needs: {shown}")
    return keys


class BlockStream:
    """Loads, writes and releases the blocks of a model built by ``open_streamed_causal_lm``.

    ``output``: the writer of the pruned checkpoint (``start_output``), None until then. ``seconds_per_block``: wall
    time each block was resident, summed over the passes that loaded it. ``activation_allowance``: bytes of
    calibration activations a walk may hold in memory before the rest go to a file in the output's directory
    (``activation_spill``); None keeps them all in memory.

    Each written block leaves its shard, then a record (``block-00003.json``: its layers' sparsity), so a run killed
    mid-way can resume (``start_output(..., resume=True)``): ``resumed`` maps the blocks recorded to their layers'
    sparsity, and while ``final_pass`` is set (the pruning pass, not a dense pass) such a block loads its pruned
    weights from the output, for the pruner to skip it and the walk to carry its outputs on.
    """

    def __init__(self, model: nn.Module, reader: CheckpointReader, keys: dict[str, str], blocks: nn.ModuleList,
                 blocks_name: str):
        self.model, self.reader, self.keys = model, reader, keys
        self.blocks, self.blocks_name = blocks, blocks_name
        self.output: ShardedCheckpointWriter | None = None
        self.written: set[int] = set()
        self.resumed: dict[int, dict[str, float]] = {}
        self.final_pass = False
        self._output_reader: CheckpointReader | None = None
        self.seconds_per_block = [0.0] * len(blocks)
        self.activation_allowance: int | None = None
        self._spills: list[ActivationSpill] = []
        self.block_parameters = [
            [name for name in keys if name.startswith(f"{blocks_name}.{index}.")] for index in range(len(blocks))]
        in_blocks = {name for names in self.block_parameters for name in names}
        self.outside_parameters = [name for name in keys if name not in in_blocks]

    @property
    def source(self) -> Path:
        return self.reader.directory

    def _bytes(self, names: list[str]) -> int:
        return sum(torch.Size(self.reader.shape(self.keys[name])).numel() * self.model.get_parameter(name).element_size()
                   for name in names)

    @property
    def outside_bytes(self) -> int:
        """Bytes of the weights outside the blocks (held all along)."""
        return self._bytes(self.outside_parameters)

    def block_bytes(self, index: int) -> int:
        return self._bytes(self.block_parameters[index])

    @property
    def largest_block_bytes(self) -> int:
        return max(map(self.block_bytes, range(len(self.blocks))))

    @property
    def held_bytes(self) -> int:
        """Bytes of weights streaming holds at once: those outside the blocks and the largest block."""
        return self.outside_bytes + self.largest_block_bytes

    def check_budget(self, budget: int) -> None:
        """MemoryBudgetError when ``budget`` bytes cannot hold what streaming holds at once."""
        if self.held_bytes > budget:
            raise MemoryBudgetError(
                f"the memory budget {gib(budget)} is smaller than what streaming holds at once: "
                f"{gib(self.held_bytes)} (weights outside the blocks {gib(self.outside_bytes)} + the largest block "
                f"{gib(self.largest_block_bytes)}); raise it to at least {gib(self.held_bytes)}")

    @property
    def spilled_bytes(self) -> int:
        """The most calibration activations one walk kept in a file (0: none did)."""
        return max((spill.spilled_bytes for spill in self._spills), default=0)

    def spill(self) -> ActivationSpill | None:
        """A spill for one calibration walk, or None without an allowance or an output directory. Its file lies in
        the output's staging directory (a rank on a machine that does not see it: the temporary directory)."""
        if self.activation_allowance is None or self.output is None:
            return None
        folder = self.output.directory if self.output.directory.is_dir() else Path(tempfile.gettempdir())
        name = f"{SPILL_PREFIX}rank{rank()}-{len(self._spills)}.spill"
        self._spills.append(ActivationSpill(folder / name, self.activation_allowance))
        return self._spills[-1]

    def load(self, index: int) -> None:
        names = self.block_parameters[index]
        reader = self._output_reader if self.final_pass and index in self.resumed else self.reader
        tensors = reader.read(self.keys[name] for name in names)
        for name in names:
            _set_parameter(self.model, name, tensors[self.keys[name]])
        check_parameters(self.blocks[index], f"streaming block {index} from {str(reader.directory)!r}",
                         prefix=f"{self.blocks_name}.{index}")

    def release(self, index: int) -> None:
        for name in self.block_parameters[index]:
            parameter = self.model.get_parameter(name)
            _set_parameter(self.model, name, torch.empty_like(parameter, device="meta"))
        _return_freed_memory()

    def release_all(self) -> None:
        """Every parameter held (the weights outside the blocks, a block left loaded) becomes a meta tensor again: a
        spent model holds no weights. The model and its stream refer to each other, so without this a dropped model's
        embeddings and LM head would stay in memory until Python's cycle collector happened to run."""
        for module in self.model.modules():
            for attribute, parameter in module._parameters.items():
                if parameter is not None and not parameter.is_meta:  # (a tied weight: emptied in both modules)
                    module._parameters[attribute] = nn.Parameter(torch.empty_like(parameter, device="meta"),
                                                                 requires_grad=False)
        _return_freed_memory()

    def _record_path(self, index: int) -> Path:
        return self.output.directory / f"block-{index + 1:05d}.json"

    def start_output(self, directory: str | os.PathLike, resume: bool = False) -> None:
        """Write into ``directory`` from now on: one shard per block, then one for everything outside the blocks
        (written at once: it is in memory already). ``resume``: keep the blocks a killed run recorded there. Under
        torch.distributed only rank 0 writes, and tells the other ranks which blocks it resumes; every rank prunes."""
        self.output = ShardedCheckpointWriter(directory, len(self.blocks) + 1)
        for leftover in self.output.directory.glob(f"{SPILL_PREFIX}*"):  # a killed run's activations
            leftover.unlink(missing_ok=True)
        if resume and is_writer():
            for index in range(len(self.blocks)):
                if self._record_path(index).is_file():  # (written after its shard: the shard is complete)
                    self.resumed[index] = json.loads(self._record_path(index).read_text())["layer_sparsity"]
        self.resumed = gathered_in_rank_order(self.resumed)[0]  # rank 0's, on every rank
        if self.resumed:
            self._output_reader = CheckpointReader(directory)  # (no index yet: the headers of its shards)
            self.output.adopt({index + 1: {self.keys[name]: self._bytes([name])
                                           for name in self.block_parameters[index]} for index in self.resumed})
        self.written |= set(self.resumed)
        if not is_writer():
            return
        self.output.write_shard(len(self.blocks) + 1,
                                {self.keys[name]: self.model.get_parameter(name) for name in self.outside_parameters})

    def write(self, index: int, layer_sparsity: dict[str, float]) -> None:
        """Write the block as it is now, then its record: ``layer_sparsity`` of the layers pruned in it."""
        if self.output is None:
            raise RuntimeError("BlockStream.write before start_output: no output directory")
        self.written.add(index)
        if not is_writer():
            return
        self.output.write_shard(index + 1, {self.keys[name]: self.model.get_parameter(name)
                                            for name in self.block_parameters[index]})
        record = self._record_path(index)
        partial = record.with_name(f".{record.name}.partial")
        partial.write_text(json.dumps({"layer_sparsity": layer_sparsity}, sort_keys=True))
        os.replace(partial, record)

    def finish(self) -> None:
        """Copy the blocks never written, unchanged, then the index and the source's config and tokenizer files."""
        if self.output is None:
            raise RuntimeError("BlockStream.finish before start_output: no output directory")
        if not is_writer():
            return
        for index in range(len(self.blocks)):
            if index not in self.written:
                keys = [self.keys[name] for name in self.block_parameters[index]]
                self.output.write_shard(index + 1, self.reader.read(keys))
        self.output.write_index()
        for index in range(len(self.blocks)):
            self._record_path(index).unlink(missing_ok=True)  # (the output is complete: nothing left to resume)
        for path in sorted(self.source.iterdir()):
            if (path.is_file() and path.suffix != ".safetensors" and path.name != INDEX_FILE
                    and path.suffix not in OTHER_WEIGHT_SUFFIXES):
                shutil.copy2(path, self.output.directory / path.name)


def block_stream(model: nn.Module) -> BlockStream | None:
    """The model's BlockStream, or None for a model held in memory."""
    return getattr(model, _STREAM_ATTRIBUTE, None)


@contextlib.contextmanager
def resident_block(model: nn.Module, index: int) -> Iterator[None]:
    """Within the block, block ``index`` of a streamed model holds its weights; afterwards they are released.
    Nothing happens for a model in memory."""
    stream = block_stream(model)
    if stream is None:
        yield
        return
    start = time.perf_counter()
    stream.load(index)
    try:
        yield
    finally:
        stream.release(index)
        stream.seconds_per_block[index] += time.perf_counter() - start


def activation_spill(model: nn.Module) -> ActivationSpill | None:
    """Where a calibration walk over ``model`` keeps the activations past its allowance: a new ``ActivationSpill``
    for a streamed model given an allowance (``prune_checkpoint``'s memory budget), else None."""
    stream = block_stream(model)
    return None if stream is None else stream.spill()


@contextlib.contextmanager
def loading_each_block(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's own forward pass works on a streamed model: each block is loaded when the
    pass reaches it and released when it returns (so every forward call reads the blocks once more). Nothing
    happens for a model in memory."""
    stream = block_stream(model)
    if stream is None:
        yield
        return
    handles = []
    for index, block in enumerate(stream.blocks):
        handles.append(block.register_forward_pre_hook(lambda _module, _args, i=index: stream.load(i)))
        handles.append(block.register_forward_hook(lambda _module, _args, _output, i=index: stream.release(i)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for index, block in enumerate(stream.blocks):
            if any(not parameter.is_meta for parameter in block.parameters()):  # a pass that stopped half-way
                stream.release(index)


def parameter_value(model: nn.Module, name: str) -> torch.Tensor:
    """The values of parameter ``name``: the parameter itself, or for a streamed block not loaded, a copy read from the
    checkpoint (so code that visits every parameter holds one at a time)."""
    parameter = model.get_parameter(name)
    stream = block_stream(model)
    if not parameter.is_meta or stream is None:
        return parameter
    return stream.reader.read([stream.keys[name]])[stream.keys[name]]


def write_block(model: nn.Module, index: int, layer_sparsity: dict[str, float]) -> None:
    """Write block ``index`` of a streamed model, as it is now, to the output checkpoint, with ``layer_sparsity`` of
    the layers pruned in it; nothing for a model in memory (its weights are the output)."""
    stream = block_stream(model)
    if stream is not None:
        stream.write(index, layer_sparsity)


def open_streamed_causal_lm(directory: str | os.PathLike) -> nn.Module:
    """A causal LM from a local checkpoint directory, built on the meta device with a ``BlockStream`` attached.

    Loads ``config.json`` (never remote code) and the tensors outside the blocks, in the dtype they are stored in; the
    blocks stay on the meta device. Raises CheckpointError for an unsupported family (naming the supported ones), a
    directory without safetensors, a missing or unreadable shard, a tensor the model needs but the shards lack, or a
    shape that disagrees with the config.
    """
    directory = Path(directory)
    reader = CheckpointReader(directory)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the config in {str(directory)!r}: {' '.join(str(err).split())}") from None
    if config.model_type not in STREAMED_MODEL_TYPES:
        raise CheckpointError(f"model type {config.model_type!r} cannot be streamed; streaming supports "
                              f"{', '.join(STREAMED_MODEL_TYPES)}")
    with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) built as usual
        model = AutoModelForCausalLM.from_config(config)
    tied = set()  # the LM head's weight when it is the input embedding's (loaded once, never written twice)
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        tied.add(next(name for name, module in model.named_modules() if module is head) + ".weight")
    keys = _checkpoint_keys(model, reader, tied)
    dtype = reader.stored_dtype(keys.values())
    blocks_name, blocks = adapter_for(model).blocks(model)
    stream = BlockStream(model, reader, keys, blocks, blocks_name)
    outside = reader.read(keys[name] for name in stream.outside_parameters)
    for name in stream.outside_parameters:
        _set_parameter(model, name, outside[keys[name]])
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    check_parameters(model, f"loading {str(directory)!r}")  # meta tensors hold no values and are skipped
    model.config.dtype = dtype
    model.eval()
    setattr(model, _STREAM_ATTRIBUTE, stream)
    logger.info("streaming %s (%s, %d blocks, %s) from %s", type(model).__name__, config.model_type, len(blocks),
                dtype, directory)
    return model
