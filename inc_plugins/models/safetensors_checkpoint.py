"""A local Hugging Face checkpoint read one tensor at a time, and a sharded one written one shard at a time.

Streaming pruning never holds a whole model: it reads a block's tensors from the safetensors shards when the block
is needed (``model.safetensors``, or the shards ``model.safetensors.index.json`` lists) and writes each finished block
as a shard of its own. Only the shards' headers (names, dtypes, shapes) are read up front, so a damaged or missing
shard, or a tensor whose shape disagrees with ``config.json``, is reported before any work starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["CheckpointError", "CheckpointReader", "ShardedCheckpointWriter", "shard_file_name"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# weights formats a directory may hold instead, named in the error when no safetensors file is there
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".gguf", ".ckpt")

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as asked: the message names the file and what is wrong."""


def _read_index(directory: Path) -> dict[str, str]:
    index = directory / INDEX_FILE
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot read {str(index)!r}: {type(err).__name__}: {err} (it must hold a "
                              f"'weight_map' of tensor name -> shard file)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{str(index)!r}: 'weight_map' must map tensor names to shard file names")
    missing = sorted({shard for shard in weight_map.values() if not (directory / shard).is_file()})
    if missing:
        raise CheckpointError(f"{str(index)!r} lists shard(s) missing from the directory: {', '.join(missing)}")
    return weight_map


def _shard_files(directory: Path) -> list[str]:
    files = sorted(path.name for path in directory.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in directory.iterdir() if p.suffix in OTHER_WEIGHT_SUFFIXES)
        found = f" (found {', '.join(others)}: save it with save_pretrained(..., safe_serialization=True))" if others else ""
        raise CheckpointError(f"no safetensors weights in {str(directory)!r}{found}")
    return files


class CheckpointReader:
    """The tensors of a local checkpoint directory, read on demand.

    ``names``: every tensor name, in the index's order (without an index, the shards' order). ``dtype(name)``, ``shape(name)``: from the headers.
    ``read(names)``: {name: tensor} in the stored dtype, each an owned copy (nothing stays mapped).
    Raises CheckpointError for a directory without safetensors files, a missing or unreadable shard, or an index
    that names a tensor its shard lacks.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"model directory {str(self.directory)!r} does not exist or is not a directory")
        headers: dict[str, dict] = {}  # shard: its header, each read once

        def header(shard: str) -> dict:
            if shard not in headers:
                headers[shard] = _read_header(self.directory / shard)
            return headers[shard]

        if (self.directory / INDEX_FILE).is_file():
            weight_map = _read_index(self.directory)
        else:
            weight_map = {}
            for shard in _shard_files(self.directory):
                for name in header(shard):
                    weight_map.setdefault(name, shard)
        self._shard_of = weight_map
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], tuple[int, int]]] = {}  # dtype, shape, bytes
        for name, shard in weight_map.items():
            if name not in header(shard):
                raise CheckpointError(f"shard {str(self.directory / shard)!r} lacks tensor {name!r}, which "
                                      f"{INDEX_FILE} places there")
            self._entries[name] = header(shard)[name]
        self.names = list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def shard_of(self, name: str) -> str:
        return self._shard_of[name]

    def stored_dtype(self, names: Iterable[str] | None = None) -> torch.dtype:
        """The floating dtype most of the tensors ``names`` (default: all) are stored in, by element count; float32
        when none is floating."""
        counts: dict[torch.dtype, int] = {}
        for name in self.names if names is None else names:
            dtype = self.dtype(name)
            if dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + int(torch.Size(self.shape(name)).numel())
        return max(counts, key=counts.get) if counts else torch.float32

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors, each read from its shard straight into memory of its own (not a mapping of the file, whose
        pages would count as this process's memory too while the shard is open)."""
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self._shard_of[name], []).append(name)
        tensors = {}
        for shard, shard_names in by_shard.items():
            path = self.directory / shard
            try:
                with open(path, "rb") as handle:
                    for name in shard_names:
                        dtype, shape, (start, stop) = self._entries[name]
                        tensor = torch.empty(shape, dtype=dtype)
                        handle.seek(start)
                        if handle.readinto(memoryview(tensor.view(torch.uint8).reshape(-1).numpy())) != stop - start:
                            raise OSError(f"tensor {name!r} is cut short")
                        tensors[name] = tensor
            except OSError as err:
                raise CheckpointError(f"cannot read shard {str(path)!r}: {' '.join(str(err).split())}") from None
        return tensors


def _read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], tuple[int, int]]]:
    """{name: (dtype, shape, (start, stop) byte offsets in the file)} from a safetensors file's header: an 8-byte
    little-endian length, then that many bytes of JSON, then the tensors' bytes. CheckpointError when it is not
    one (or names a dtype torch lacks, or byte ranges that do not match the shapes or the file)."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            size = os.fstat(handle.fileno()).st_size
            if not 2 <= length <= size - 8:
                raise ValueError("not a safetensors file (its header length is impossible)")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read shard {str(path)!r}: {' '.join(str(err).split())}") from None
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = _DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"shard {str(path)!r}: tensor {name!r} has an unreadable header entry {entry!r} "
                                  f"(dtypes read: {', '.join(_DTYPES)})") from None
        begin, end = 8 + length + start, 8 + length + stop
        if end - begin != torch.Size(shape).numel() * dtype.itemsize or end > size:
            raise CheckpointError(f"shard {str(path)!r}: tensor {name!r} ({entry['dtype']} {list(shape)}) has "
                                  f"byte range [{start}, {stop}), which does not match its shape or the file")
        entries[name] = (dtype, shape, (begin, end))
    return entries


def shard_file_name(number: int, count: int) -> str:
    """transformers' shard naming: ``model-00003-of-00031.safetensors`` (``number`` counts from 1)."""
    return f"model-{number:05d}-of-{count:05d}.safetensors"


def _atomic_save(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    save_file({name: tensor.detach().contiguous() for name, tensor in tensors.items()}, partial,
              metadata={"format": "pt"})
    os.replace(partial, path)


class ShardedCheckpointWriter:
    """Writes a checkpoint of ``count`` shards into ``directory``, one shard at a time, each file complete or absent.

    ``write_shard(number, tensors)`` saves shard ``number`` (1-based) under a temporary name and renames it;
    ``write_index()`` writes ``model.safetensors.index.json`` for every shard written, so that
    ``from_pretrained(directory)`` loads the result.
    """

    def __init__(self, directory: str | os.PathLike, count: int):
        self.directory = Path(directory)
        self.count = count
        self._names: dict[int, list[str]] = {}
        self._bytes = 0

    def path(self, number: int) -> Path:
        return self.directory / shard_file_name(number, self.count)

    def write_shard(self, number: int, tensors: Mapping[str, torch.Tensor]) -> None:
        if not 1 <= number <= self.count:
            raise ValueError(f"shard number {number} outside 1..{self.count}")
        _atomic_save(tensors, self.path(number))
        self._names[number] = list(tensors)
        self._bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def adopt(self, shards: Mapping[int, Mapping[str, int]]) -> None:
        """Count shards a killed run wrote ({number: {tensor name: bytes}}) as written: a resumed run keeps them."""
        for number, sizes in shards.items():
            self._names[number] = list(sizes)
            self._bytes += sum(sizes.values())

    def write_index(self) -> None:
        missing = [n for n in range(1, self.count + 1) if n not in self._names]
        if missing:
            raise RuntimeError(f"shards {missing} of {self.count} were never written")
        weight_map = {name: shard_file_name(number, self.count)
                      for number in sorted(self._names) for name in self._names[number]}
        index = {"metadata": {"total_size": self._bytes}, "weight_map": weight_map}
        partial = self.directory / f".{INDEX_FILE}.partial"
        partial.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.replace(partial, self.directory / INDEX_FILE)
