"""``prune_checkpoint``: prune a decoder checkpoint directory into a new one without ever holding the whole model.

The model is built on the meta device and its blocks stream through memory one at a time
(``execution.streamed_model``): ``inc_plugins.prepare_pruning`` runs on it as on any model, the one-shot type's
block walk loads each block from the source shards, prunes it and writes it as a shard of the output. Peak memory is
what lies outside the blocks (embeddings, LM head), one block, and the calibration activations of one block.

The output is written into ``.<name>.partial`` beside ``output`` and renamed when complete, so ``output`` is either
a whole checkpoint (shards, index, the source's config and tokenizer files) or absent.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

from neural_compressor import WeightPruningConfig

from inc_plugins.execution.streamed_model import block_stream, open_streamed_causal_lm

from .config_checks import PruningConfigError
from .entry import prepare_pruning
from .one_shot_base import PruningResult

__all__ = ["CheckpointPruning", "prune_checkpoint"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointPruning:
    """What ``prune_checkpoint`` did: the pruning's ``result`` (per-layer sparsity), where the output is, the weights'
    dtype, the wall seconds each block was held (all passes), and the process's peak resident memory so far."""

    result: PruningResult
    output: Path
    dtype: str
    seconds_per_block: list[float]
    peak_rss_bytes: int


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def prune_checkpoint(source: str | os.PathLike, output: str | os.PathLike, config: WeightPruningConfig,
                     dataloader=None) -> CheckpointPruning:
    """Prune the causal LM in checkpoint directory ``source`` with ``config`` into the new directory ``output``.

    ``config`` names one streaming type (``one_shot.streaming_types``: wanda, one_shot_magnitude, and sparse_gpt run
    by the plugins' SparseGPT, which gives INC's weights); ``dataloader`` yields its calibration batches as for
    ``prepare_pruning``. Weights keep their stored dtype. Raises CheckpointError for a source that cannot be read
    (before any work) and PruningConfigError for an ``output`` that exists or a config that cannot stream.
    """
    output = Path(output)
    if output.exists():
        raise PruningConfigError(f"output directory {str(output)!r} exists; name a new one (nothing is overwritten)")
    model = open_streamed_causal_lm(source)
    stream = block_stream(model)
    staging = output.parent / f".{output.name}.partial"
    if staging.exists():  # left by an interrupted run of ours
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        stream.start_output(staging)
        pruning = prepare_pruning(model, config, dataloader=dataloader)
        stream.finish()
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("pruned %s into %s in %.1f s of block time", source, output, sum(stream.seconds_per_block))
    return CheckpointPruning(result=pruning.result, output=output, dtype=str(model.config.dtype).removeprefix("torch."),
                             seconds_per_block=list(stream.seconds_per_block), peak_rss_bytes=_peak_rss_bytes())
