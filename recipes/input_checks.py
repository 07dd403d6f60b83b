"""Cheap checks of the files a recipe names, before anything is loaded: each failure is one line that names the file.

- `check_model_dir`: a local model directory has a readable config.json with a `model_type`, weights whose
  headers are intact (a truncated safetensors file is caught here from its header alone, without reading any
  tensor), and tokenizer files.
- `check_tokenizer`: after loading, a tokenizer that transformers built from nothing (a directory without
  tokenizer files gives one with only its special tokens, which maps every word to [UNK]) is refused.
- `read_text_file`: a data or corpus file exists, is a readable, non-empty UTF-8 file (the byte offset of the first
  byte that is not UTF-8 is reported).
"""

import codecs
import json
import math
import zipfile
from pathlib import Path

from transformers import CONFIG_MAPPING

from .schema import RecipeError

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
# the order transformers looks for weights in
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX)
# any one of these file sets lets transformers build a tokenizer (tokenizer_config.json adds settings to it)
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"), ("tokenizer.model",),
                       ("spiece.model",), ("sentencepiece.bpe.model",))
ALLOWED_TOKENIZER_FILES = ("tokenizer.json, or a vocabulary file (vocab.txt; vocab.json with merges.txt; "
                           "tokenizer.model; spiece.model; sentencepiece.bpe.model) next to tokenizer_config.json")
# safetensors refuses headers above 100 MB; a larger length field means a damaged or foreign file
MAX_SAFETENSORS_HEADER = 100_000_000
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                           "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# A sentence any real tokenizer of English splits into known pieces.
ORDINARY_SENTENCE = "The film was good, and the story was fun to watch."
# Fewer ordinary (non-special) tokens than this is not a vocabulary: transformers built the tokenizer from nothing.
MIN_ORDINARY_TOKENS = 32


def _name(path: Path) -> str:
    return repr(str(path))


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise RecipeError(f"{what} {_name(path)} cannot be read: {err.strerror or err}") from None


def _utf8_error(path: Path, what: str, data: bytes, err: UnicodeDecodeError, skipped: int = 0) -> RecipeError:
    offset = err.start + skipped
    line = data[:offset].count(b"\n") + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return RecipeError(f"{what} {_name(path)} is not UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} "
                       f"(line {line}, column {column}) is not valid UTF-8; save the file as UTF-8")


def read_text_file(path: Path, what: str) -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped); RecipeError naming the file when it is
    missing, a directory, unreadable, not UTF-8 or empty."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{what} {_name(path)} does not exist (paths in a recipe are relative to the recipe file)")
    if path.is_dir():
        raise RecipeError(f"{what} {_name(path)} is a directory, not a file")
    data = _read_bytes(path, what)
    skipped = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skipped:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise _utf8_error(path, what, data, err, skipped) from None
    if not text.strip():
        raise RecipeError(f"{what} {_name(path)} is empty" + (" (only white space)" if text else ""))
    return text


def read_json_file(path: Path, what: str):
    data = _read_bytes(path, what)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise _utf8_error(path, what, data, err) from None
    except json.JSONDecodeError as err:
        raise RecipeError(f"{what} {_name(path)} is not valid JSON: {err.msg} (line {err.lineno}, column "
                          f"{err.colno})" + (" (the file is empty)" if not data.strip() else "")) from None


# ------------------------------------------------------------------------------------------------------- weights


def check_safetensors(path: Path) -> None:
    """The 8-byte header length, the JSON header, and every tensor's byte range against the file's size."""
    what = "weights file"
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            length_field = handle.read(8)
            if len(length_field) < 8:
                raise RecipeError(f"{what} {_name(path)} is truncated: {size} bytes, too short for a safetensors "
                                  f"header")
            length = int.from_bytes(length_field, "little")
            if length > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise RecipeError(f"{what} {_name(path)} is truncated or not a safetensors file: its header length "
                                  f"field says {length} bytes, but the file has {size - 8} bytes after it")
            raw = handle.read(length)
    except OSError as err:
        raise RecipeError(f"{what} {_name(path)} cannot be read: {err.strerror or err}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecipeError(f"{what} {_name(path)} is damaged: its safetensors header is not valid JSON "
                          f"({err})") from None
    if not isinstance(header, dict):
        raise RecipeError(f"{what} {_name(path)} is damaged: its safetensors header is not a JSON object")
    data_bytes, end, last = size - 8 - length, 0, None
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise RecipeError(f"{what} {_name(path)} is damaged: tensor {name!r} has data_offsets {offsets!r}")
        width, shape = SAFETENSORS_DTYPE_BYTES.get(info.get("dtype")), info.get("shape")
        if width is not None and isinstance(shape, list) and all(isinstance(d, int) for d in shape):
            if math.prod(shape) * width != offsets[1] - offsets[0]:
                raise RecipeError(f"{what} {_name(path)} is damaged: tensor {name!r} ({info['dtype']} {shape}) "
                                  f"spans {offsets[1] - offsets[0]} bytes")
        if offsets[1] > end:
            end, last = offsets[1], name
    if end > data_bytes:
        raise RecipeError(f"{what} {_name(path)} is truncated: its header says the tensor data runs to byte {end} "
                          f"(tensor {last!r}), but the file holds {data_bytes} bytes of tensor data ({size} bytes "
                          f"in all, {end - data_bytes} missing); copy or save it again")
    if end < data_bytes:
        raise RecipeError(f"{what} {_name(path)} is damaged: {data_bytes - end} bytes follow the last tensor's data "
                          f"(its header covers {end} bytes of tensor data); copy or save it again")


def check_pytorch_bin(path: Path) -> None:
    """A torch.save file: a zip archive whose central directory is intact, or a legacy pickle."""
    what = "weights file"
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            start = handle.read(4)
        if start.startswith(b"PK"):
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
            return
    except zipfile.BadZipFile as err:
        raise RecipeError(f"{what} {_name(path)} is truncated or damaged ({size} bytes): {err}") from None
    except OSError as err:
        raise RecipeError(f"{what} {_name(path)} cannot be read: {err.strerror or err}") from None
    if not start.startswith(b"\x80"):  # a pickle protocol byte: the pre-1.6 torch.save format
        raise RecipeError(f"{what} {_name(path)} is not a torch.save file ({size} bytes)")


def _check_sharded(directory: Path, index_name: str, check_shard) -> None:
    index_path = directory / index_name
    index = read_json_file(index_path, "weights index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise RecipeError(f"weights index {_name(index_path)} has no 'weight_map' of tensor names to shard files")
    for shard in sorted(set(map(str, weight_map.values()))):
        shard_path = directory / shard
        if not shard_path.is_file() or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise RecipeError(f"weights index {_name(index_path)} names shard {shard!r}, which is missing from "
                              f"{str(directory)!r}")
        check_shard(shard_path)


def check_weights(directory: Path, label: str) -> Path:
    """The weights file transformers would load (checked), or RecipeError naming what is missing or damaged."""
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            if name == SAFETENSORS:
                check_safetensors(path)
            elif name == PYTORCH_BIN:
                check_pytorch_bin(path)
            else:
                _check_sharded(directory, name, check_safetensors if name == SAFETENSORS_INDEX else check_pytorch_bin)
            return path
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    hint = (f"; it holds {', '.join(ggufs)}, but a GGUF file is only read through model.asset (save a GGUF model "
            f"with save_pretrained to use it from a directory)") if ggufs else ""
    raise RecipeError(f"{label} {_name(directory)} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} "
                      f"with its shards, or {PYTORCH_BIN}{hint}")


# ------------------------------------------------------------------------------------------------- config, tokenizer


def check_config(directory: Path, label: str) -> dict:
    path = directory / CONFIG
    if not path.is_file():
        ggufs = sorted(p.name for p in directory.glob("*.gguf"))
        hint = (f"; it holds {', '.join(ggufs)}, but a GGUF file is only read through model.asset" if ggufs else "")
        raise RecipeError(f"{label} {_name(directory)} is not a model directory (no {CONFIG} in it){hint}")
    config = read_json_file(path, "model config")
    if not isinstance(config, dict):
        raise RecipeError(f"model config {_name(path)} is not a JSON object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise RecipeError(f"model config {_name(path)} has no 'model_type' (e.g. \"bert\", \"llama\"): it is not a "
                          f"transformers config")
    if model_type not in CONFIG_MAPPING:
        raise RecipeError(f"model config {_name(path)}: model_type {model_type!r} is not an architecture this "
                          f"transformers knows (code shipped with a model is never run)")
    return config


def tokenizer_files(directory: Path) -> list[str]:
    """The first set of tokenizer files present in the directory, or [] when there is none."""
    for names in TOKENIZER_FILE_SETS:
        if all((directory / name).is_file() for name in names):
            return list(names)
    return []


def check_tokenizer_files(directory: Path, label: str) -> None:
    found = tokenizer_files(directory)
    if not found:
        present = sorted(p.name for p in directory.iterdir() if "token" in p.name or "vocab" in p.name
                         or "merges" in p.name)
        raise RecipeError(f"{label} {_name(directory)} has no tokenizer files"
                          + (f" (only {', '.join(present)})" if present else "")
                          + f": transformers would build an empty tokenizer that maps every word to [UNK]; "
                            f"allowed: {ALLOWED_TOKENIZER_FILES}")
    for name in found:
        if name.endswith(".json"):
            read_json_file(directory / name, "tokenizer file")
        elif (directory / name).stat().st_size == 0:
            raise RecipeError(f"tokenizer file {_name(directory / name)} is empty")


def check_model_dir(directory: Path, label: str = "model.path", needs_tokenizer: bool = True) -> None:
    """Every check of a local model directory that reads no tensor: RecipeError naming the file at fault."""
    directory = Path(directory)
    if not directory.exists():
        raise RecipeError(f"{label} {_name(directory)} does not exist (paths in a recipe are relative to the recipe "
                          f"file)")
    if not directory.is_dir():
        raise RecipeError(f"{label} {_name(directory)} is a file, not a model directory")
    check_config(directory, label)
    check_weights(directory, label)
    if needs_tokenizer:
        check_tokenizer_files(directory, label)


def check_tokenizer(tokenizer, where) -> None:
    """Refuses a loaded tokenizer that has (almost) no vocabulary or maps an ordinary sentence to the unknown
    token only: transformers builds one from a directory without tokenizer files instead of failing."""
    unk = getattr(tokenizer, "unk_token", None) or "the unknown token"
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    size = len(tokenizer)
    ids = tokenizer(ORDINARY_SENTENCE, add_special_tokens=False)["input_ids"]
    unk_id = getattr(tokenizer, "unk_token_id", None)
    if ids and (unk_id is None or any(i != unk_id for i in ids)) and size - len(specials) >= MIN_ORDINARY_TOKENS:
        return
    if not ids:
        what = "maps an ordinary sentence to no tokens at all"
    elif unk_id is not None and all(i == unk_id for i in ids):
        what = f"maps every word to {unk}"
    else:
        what = "has almost no vocabulary"
    raise RecipeError(f"tokenizer from {str(where)} {what}: the directory lacks tokenizer files; allowed: "
                      f"{ALLOWED_TOKENIZER_FILES} (the loaded tokenizer has {size} tokens, {len(specials)} of them "
                      f"special)")
