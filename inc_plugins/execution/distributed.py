"""Calibration across processes (torch.distributed, gloo on CPU): each rank runs the block walk on its own shard of
the calibration batches, and before a block is pruned every layer's statistics are gathered from all ranks and
combined in rank order. Every rank then holds the same bits and derives the same masks, so the pruned block's
outputs, which feed the next block, are right on every rank; only rank 0 writes files (``is_writer``).

Wanda's feature norms keep each batch's contribution and are replayed in one process's batch order
(``InputFeatureNorms.combined``; the order of ``rank_shard``'s split), so with the same per-batch activations the ranks'
norms are one process's bits. The other statistics (``InputGram``, ``InputFeatureMoments``: a batch's X^T X is too big
to send) are combined from per-rank sums weighted by their counts, which rounds in another order than one process
adding every batch in turn: a mask can then differ from the single-process one where two candidates are within float32
rounding of each other (measured in docs/results/streaming.md). The ranking after it is split too: each rank ranks its
share of a block's layers and the keep masks are gathered (``WandaPruner.share_masks``). With one process nothing here
does anything.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

__all__ = ["GatherLog", "combined_across_ranks", "gathered_in_rank_order", "is_writer", "rank", "rank_shard",
           "torchrun_process_group", "unsharded", "world_size"]

# How long a rank waits in a collective for the others: rank 0 evaluates the dense model while the other ranks wait
# at the first gather, which at 7B takes many minutes on a few cores.
COLLECTIVE_TIMEOUT = timedelta(hours=6)


def world_size() -> int:
    """Processes in the default group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_writer() -> bool:
    """Whether this process writes the outputs (rank 0; the only process without a group)."""
    return rank() == 0


class _Combinable(Protocol):
    @classmethod
    def combined(cls, parts): ...


Statistic = TypeVar("Statistic", bound=_Combinable)


def _tensor_bytes(value: object) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or lists and tuples of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(map(_tensor_bytes, value))
    return 0


def _payload_bytes(statistic: object) -> int:
    return sum(map(_tensor_bytes, vars(statistic).values()))


@dataclass
class GatherLog:
    """What the gathers moved: bytes this rank sent, per block index."""

    bytes_per_block: dict[int, int] = field(default_factory=dict)

    def add(self, block: int, size: int) -> None:
        self.bytes_per_block[block] = self.bytes_per_block.get(block, 0) + size


def combined_across_ranks(statistic: Statistic, log: GatherLog | None = None, block: int = -1) -> Statistic:
    """Every rank's ``statistic`` (same type and shape on each), combined in rank order by its type's ``combined``:
    the same object on every rank. Returns ``statistic`` itself when there is one process."""
    if world_size() == 1:
        return statistic
    parts = gathered_in_rank_order(statistic)
    if log is not None:
        log.add(block, _payload_bytes(statistic))
    return type(statistic).combined(parts)


def gathered_in_rank_order(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` with one process."""
    if world_size() == 1:
        return [value]
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, value)
    return parts


def rank_shard(items: Sequence[Any]) -> list[Any]:
    """This rank's share of ``items``: every world_size-th item from its rank on (all of them with one process)."""
    return list(items[rank()::world_size()])


def unsharded(share: Sequence[Any]) -> list[Any]:
    """The items every rank holds a ``rank_shard`` of, on every rank, in their order before the split (``share``
    itself with one process): item i is item i // world_size of rank i % world_size's share."""
    parts = gathered_in_rank_order(list(share))
    return [parts[index % len(parts)][index // len(parts)] for index in range(sum(map(len, parts)))]


@contextlib.contextmanager
def torchrun_process_group() -> Iterator[None]:
    """Within the block, a gloo process group when launched by torchrun (``WORLD_SIZE`` > 1 in the environment, with
    its ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``); nothing otherwise, or when a group exists already."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()
