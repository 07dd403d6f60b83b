"""Calibration activations kept in a file when they would not fit in memory.

Block-by-block calibration holds every calibration batch's hidden states between two blocks (``execution.calibration``).
At 7B that is 32 KB per token in float32: 128 sequences of 2048 tokens take 8 GiB. ``ActivationSpill`` keeps them in
memory up to an allowance of bytes; from the batch that would exceed it on, every batch's hidden states (those already
held included) live in one file, and a batch's tensor is read when a block runs on it and written back, in place, when
the block's output replaces it. Memory then holds one batch at a time, whatever the calibration set.

The file is read and written with ``pread``/``pwrite`` into tensors of their own rather than mapped: pages of a mapped
file count in the process's resident memory until the kernel needs them back, so a mapped file would look (and, for a
memory budget, count) like activations in memory. The page cache still serves repeated reads without touching disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["ActivationSpill", "SpilledTensor"]


def _byte_view(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.view(torch.uint8).reshape(-1).numpy())


class SpilledTensor:
    """A tensor stored at ``offset`` in an ``ActivationSpill``'s file: ``read()`` returns it, ``write(t)`` replaces it
    with ``t`` of the same shape and dtype."""

    def __init__(self, spill: ActivationSpill, offset: int, shape: torch.Size, dtype: torch.dtype):
        self._spill, self._offset, self.shape, self.dtype = spill, offset, shape, dtype

    def read(self) -> torch.Tensor:
        tensor = torch.empty(self.shape, dtype=self.dtype)
        view, done = _byte_view(tensor), 0
        while done < len(view):  # (one call reads at most 2 GiB)
            count = os.preadv(self._spill.fd, [view[done:]], self._offset + done)
            if count == 0:
                raise OSError(f"{str(self._spill.path)!r} ends before the activations stored in it")
            done += count
        return tensor

    def write(self, tensor: torch.Tensor) -> None:
        if tensor.shape != self.shape or tensor.dtype != self.dtype:
            raise ValueError(f"a spilled activation of shape {list(self.shape)} ({self.dtype}) cannot be replaced by "
                             f"one of shape {list(tensor.shape)} ({tensor.dtype})")
        view, done = _byte_view(tensor.detach().contiguous()), 0
        while done < len(view):
            done += os.pwrite(self._spill.fd, view[done:], self._offset + done)


class ActivationSpill:
    """Hidden states past ``allowance`` bytes go to the file ``path`` (created, and removed by ``close``).

    ``hold(block_input)`` takes each calibration batch's recorded block input as it is captured: while the inputs held
    so far fit the allowance they stay in memory; the first one that does not moves them all, and every later one, to
    the file (``BlockInput.spill_into``). ``spilled_bytes``: bytes in the file.
    """

    def __init__(self, path: str | os.PathLike, allowance: int):
        self.path, self.allowance = Path(path), max(int(allowance), 0)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.spilled_bytes = 0
        self._in_memory: list = []
        self._held_bytes = 0

    def store(self, tensor: torch.Tensor) -> SpilledTensor:
        slot = SpilledTensor(self, self.spilled_bytes, tensor.shape, tensor.dtype)
        self.spilled_bytes += tensor.numel() * tensor.element_size()
        slot.write(tensor)
        return slot

    def hold(self, block_input) -> None:
        size = block_input.hidden_states.numel() * block_input.hidden_states.element_size()
        if self.spilled_bytes == 0 and self._held_bytes + size <= self.allowance:
            self._in_memory.append(block_input)
            self._held_bytes += size
            return
        for held in self._in_memory:
            held.spill_into(self)
        self._in_memory, self._held_bytes = [], 0
        block_input.spill_into(self)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)
