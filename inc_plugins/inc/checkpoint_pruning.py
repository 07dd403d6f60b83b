"""``prune_checkpoint``: prune a decoder checkpoint directory into a new one without ever holding the whole model.

The model is built on the meta device and its blocks stream through memory one at a time
(``execution.streamed_model``): ``inc_plugins.prepare_pruning`` runs on it as on any model, the one-shot type's
block walk loads each block from the source shards, prunes it and writes it as a shard of the output. Peak memory is
what lies outside the blocks (embeddings, LM head), one block, and the calibration activations of one block.

The output is written into ``.<name>.partial`` beside ``output`` and renamed when complete, so ``output`` is either
a whole checkpoint (shards, index, the source's config and tokenizer files) or absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from neural_compressor import WeightPruningConfig

from inc_plugins.execution.distributed import GatherLog, gathered_in_rank_order, is_writer, world_size
from inc_plugins.execution.streamed_model import (
    BlockStream,
    MemoryBudgetError,
    block_stream,
    open_streamed_causal_lm,
)
from inc_plugins.models.batch_inputs import named_batch_tensors
from inc_plugins.models.safetensors_checkpoint import CheckpointReader
from inc_plugins.perf.memory import available_bytes, peak_rss_bytes, rss_bytes

from .config_checks import PruningConfigError
from .entry import prepare_pruning
from .one_shot_base import PruningResult

__all__ = ["CheckpointPruning", "activation_allowance", "partial_output", "prune_checkpoint"]

logger = logging.getLogger(__name__)

RUN_MANIFEST = "run.json"  # in the staging directory: what a resumed run must match


@dataclass(frozen=True)
class CheckpointPruning:
    """What ``prune_checkpoint`` did: the pruning's ``result`` (per-layer sparsity), where the output is, the weights'
    dtype, the wall seconds each block was held (all passes), the process's peak resident memory so far, and under
    torch.distributed the number of processes, the calibration samples each rank processed (in rank order) and the
    bytes of statistics this rank sent per block; the memory budget and the bytes of activations kept on disk."""

    result: PruningResult
    output: Path
    dtype: str
    seconds_per_block: list[float]
    peak_rss_bytes: int
    world_size: int = 1
    samples_per_rank: list[int] = field(default_factory=list)
    bytes_gathered_per_block: dict[int, int] = field(default_factory=dict)
    resumed_blocks: list[int] = field(default_factory=list)  # taken from the interrupted run a resume continued
    memory_budget: int = 0
    activations_spilled_bytes: int = 0  # the most calibration activations one pass kept on disk (0: all in memory)


def _samples(batch) -> int:
    """Sequences in a calibration batch: the first dimension of its first tensor."""
    return next(named_batch_tensors(batch))[1].shape[0]


def _run_identity(reader: CheckpointReader, config: WeightPruningConfig, batches: list | None) -> dict:
    """What a resumed run must share with the run it continues: the source checkpoint (its tensors' names, dtypes
    and shapes, and its shards' sizes), the config, and a hash of the calibration batches this rank holds."""
    source = reader.directory
    shards = sorted({reader.shard_of(name) for name in reader.names})
    checkpoint = hashlib.sha256(json.dumps(
        [[name, str(reader.dtype(name)), reader.shape(name)] for name in reader.names]
        + [[shard, (source / shard).stat().st_size] for shard in shards]).encode()).hexdigest()
    calibration = hashlib.sha256()
    for batch in batches or []:
        for _, tensor in named_batch_tensors(batch):
            calibration.update(f"{tensor.dtype}{list(tensor.shape)}".encode())
            calibration.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    settings = {"global": dict(config.weight_compression), "entries": config.pruning_configs}
    return {"source": str(source.resolve()), "checkpoint_sha256": checkpoint,
            "config": json.loads(json.dumps(settings, sort_keys=True, default=str)),
            "calibration_sha256": calibration.hexdigest(), "world_size": world_size()}


def activation_allowance(budget: int, stream: BlockStream) -> int:
    """Bytes of calibration activations a pass may hold in memory within ``budget``: what the process holds now
    (interpreter, libraries, the weights outside the blocks), one block, and the pruning's float32 working set
    for it (scores, norms, SparseGPT's Hessians and their inverses: taken as twice the block in float32) come first.
    Measured at 7B (hidden 4096, 32 blocks): 1.0 GB held after opening, 0.4 GB per bf16 block, a 2.4 GiB peak
    with every activation in memory."""
    largest_float32 = max(sum(stream.model.get_parameter(name).numel() for name in names)
                          for names in stream.block_parameters) * 4
    return budget - rss_bytes() - stream.largest_block_bytes - 2 * largest_float32


def partial_output(output: Path) -> Path:
    """Where ``prune_checkpoint`` writes ``output`` until it is complete, and a killed run leaves it to resume."""
    return output.parent / f".{output.name}.partial"


def _prepare_staging(staging: Path, identity: dict, resume: bool) -> None:
    """Create the staging directory, or with ``resume`` check that the one there was left by this same run."""
    manifest = staging / RUN_MANIFEST
    if not resume:
        if staging.exists():
            raise PruningConfigError(f"{str(staging)!r} holds an interrupted run of this output: continue it with "
                                     f"resume=True (recipes: --resume), or delete it to start again")
        staging.mkdir(parents=True)
        manifest.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
        return
    if not manifest.is_file():
        raise PruningConfigError(f"nothing to resume: no interrupted run in {str(staging)!r}")
    recorded = json.loads(manifest.read_text())
    differing = [key for key in identity if recorded.get(key) != identity[key]]
    if differing:
        raise PruningConfigError(f"cannot resume the run in {str(staging)!r}: its {', '.join(differing)} differ from "
                                 f"this run's (resume only the same source, config and calibration data)")


def _opened(source: str | os.PathLike | torch.nn.Module) -> torch.nn.Module:
    """The streamed model of ``source``: a checkpoint directory, opened now, or a model ``open_streamed_causal_lm``
    opened (a caller that holds one already passes it, so the weights outside the blocks are not held twice)."""
    if not isinstance(source, torch.nn.Module):
        return open_streamed_causal_lm(source)
    stream = block_stream(source)
    if stream is None:
        raise PruningConfigError(f"prune_checkpoint takes a checkpoint directory or a model opened with "
                                 f"open_streamed_causal_lm, not a {type(source).__name__} held in memory: "
                                 f"prune it with prepare_pruning")
    if stream.output is not None:  # its blocks would still be read from the source, unpruned
        raise PruningConfigError("this streamed model was pruned already and its blocks are the source's: open the "
                                 "output checkpoint to prune it again")
    return source


def prune_checkpoint(source: str | os.PathLike | torch.nn.Module, output: str | os.PathLike,
                     config: WeightPruningConfig, dataloader=None, resume: bool = False,
                     memory_budget: int | None = None) -> CheckpointPruning:
    """Prune the causal LM in checkpoint directory ``source`` with ``config`` into the new directory ``output``.

    ``source`` may also be the model ``open_streamed_causal_lm`` opened from that directory; it is spent afterwards,
    its weights released (open ``output`` for the pruned model).

    ``config`` names one streaming type (``one_shot.streaming_types``: wanda, one_shot_magnitude, and sparse_gpt run
    by the plugins' SparseGPT, which gives INC's weights); ``dataloader`` yields its calibration batches as for
    ``prepare_pruning``. Weights keep their stored dtype. Under torch.distributed each rank passes its own shard of
    the calibration batches, every rank prunes (with statistics combined across ranks) and rank 0 writes; every
    rank returns once the output is complete. Raises CheckpointError for a source that cannot be read (before any
    work) and PruningConfigError for an ``output`` that exists or a config that cannot stream.

    The output is written into ``.<name>.partial`` beside it, block by block. An error removes it; a run killed or
    interrupted (Ctrl-C) leaves it, and ``resume=True`` continues it from its last completed block (it must be the
    same source, config and calibration data), ending with the output of an uninterrupted run.

    ``memory_budget`` (bytes; default: the memory available now) bounds what the run holds: PruningConfigError when it
    cannot hold the weights outside the blocks and the largest block; calibration activations past
    ``activation_allowance`` are kept in a file in the staging directory while a pass runs.
    """
    output = Path(output)
    if output.exists():
        raise PruningConfigError(f"output directory {str(output)!r} exists; name a new one (nothing is overwritten)")
    model = _opened(source)
    stream = block_stream(model)
    budget = int(memory_budget) if memory_budget is not None else available_bytes()
    try:
        stream.check_budget(budget)
    except MemoryBudgetError as err:
        raise PruningConfigError(str(err)) from None
    stream.activation_allowance = activation_allowance(budget, stream)
    batches = list(dataloader) if dataloader is not None else None  # counted, and read by every pass
    staging = partial_output(output)
    if is_writer():
        _prepare_staging(staging, _run_identity(stream.reader, config, batches), resume)
    try:
        stream.start_output(staging, resume=resume)
        pruning = prepare_pruning(model, config, dataloader=batches)
        stream.finish()
        if is_writer():
            (staging / RUN_MANIFEST).unlink()
            os.rename(staging, output)
    except Exception:
        if is_writer() and not resume:  # an error, not an interruption: resuming would meet it again
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:  # the model is spent either way: its weights go now, not when the caller drops it
        stream.release_all()
    # (a collective: also, no rank returns before rank 0 has renamed the output)
    samples = gathered_in_rank_order(sum(map(_samples, batches)) if batches is not None else 0)
    logger.info("pruned %s into %s in %.1f s of block time", stream.reader.directory, output,
                sum(stream.seconds_per_block))
    return CheckpointPruning(result=pruning.result, output=output, dtype=str(model.config.dtype).removeprefix("torch."),
                             seconds_per_block=list(stream.seconds_per_block), peak_rss_bytes=peak_rss_bytes(),
                             world_size=world_size(), samples_per_rank=samples, resumed_blocks=sorted(stream.resumed),
                             memory_budget=budget, activations_spilled_bytes=stream.spilled_bytes,
                             bytes_gathered_per_block=dict(getattr(pruning, "gather_log", GatherLog()).bytes_per_block))
