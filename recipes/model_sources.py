"""Loads the model and tokenizer a recipe names: an offline asset, a local directory, or (only when named) a hub id."""

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from inc_plugins.assets import ASSETS, AssetError, asset_path, cache_root
from inc_plugins.models.safetensors_checkpoint import CheckpointError, CheckpointReader

from .input_checks import check_model_dir, check_tokenizer, check_weights
from .schema import ModelSource, RecipeError

try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors
    from safetensors._safetensors_rust import SafetensorError

# what a failing local load raises: unreadable or damaged files (OSError), bad JSON or values (ValueError, which
# JSONDecodeError and UnicodeDecodeError are), damaged safetensors files
LOAD_ERRORS = (OSError, ValueError, SafetensorError)


def model_directory(source: ModelSource) -> Path | str:
    if source.asset is not None:
        try:
            return asset_path(source.asset)
        except AssetError as err:
            raise RecipeError(str(err)) from None
    if source.path is not None:
        check_model_dir(source.path)  # config, weights headers and tokenizer files, before transformers reads them
        return source.path
    return source.hub_id


def load_error(where, err: Exception) -> RecipeError:
    """One line naming the model directory, or the weights file a safetensors error comes from, and what is wrong."""
    detail = " ".join(str(err).split()) or type(err).__name__
    weights = sorted(Path(where).glob("*.safetensors")) if Path(where).is_dir() else []
    if isinstance(err, SafetensorError) and len(weights) == 1:
        return RecipeError(f"cannot load weights file {str(weights[0])!r}: {detail}")
    return RecipeError(f"cannot load the model in {str(where)!r}: {type(err).__name__}: {detail}")


def _from_pretrained(source: ModelSource, load):
    """Runs `load(where, kwargs)` (transformers' from_pretrained calls) and turns its errors into one line."""
    where = model_directory(source)
    local = source.hub_id is None
    kwargs = {"revision": source.revision, "trust_remote_code": source.trust_remote_code, "local_files_only": local}
    try:
        model, tokenizer = load(where, kwargs)
    except RecipeError:
        raise
    except LOAD_ERRORS as err:
        if local:
            raise load_error(where, err) from None
        if not isinstance(err, OSError):
            raise RecipeError(f"cannot load hub model {source.hub_id!r}: {type(err).__name__}: "
                              f"{' '.join(str(err).split())}") from None
        raise RecipeError(
            f"cannot reach hub model {source.hub_id!r} (is this machine offline?). "
            f"Offline recipes use model.asset, one of: {', '.join(ASSETS)}"
        ) from None
    return model.eval(), tokenizer


def load_classifier(source: ModelSource, head_seed: int = 0):
    """(model, tokenizer) for sequence classification with `num_labels` outputs, in eval mode.

    A checkpoint without a task head gets a new one, drawn from torch's RNG: seeded with `head_seed` inside
    `fork_rng`, so the head (and everything fine-tuned from it) is the same on every run, whatever ran before."""
    def load(where, kwargs):
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        check_tokenizer(tokenizer, where)  # before the model load: a tokenizer built from nothing fails at once
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(head_seed)
            model = AutoModelForSequenceClassification.from_pretrained(where, num_labels=source.num_labels, **kwargs)
        return model, tokenizer

    return _from_pretrained(source, load)


def stored_dtype(where: Path | str) -> torch.dtype | str:
    """The dtype a checkpoint directory's safetensors weights are stored in; "auto" (transformers reads the config)
    for other checkpoints and hub ids."""
    try:
        return CheckpointReader(where).stored_dtype()
    except CheckpointError:
        return "auto"


def load_local_causal_lm(source: ModelSource, float32: bool):
    """(model, tokenizer) of a causal LM from model.path (or hub_id) in eval mode: its weights in the dtype they are
    stored in, or with `float32` in float32."""
    def load(where, kwargs):
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        check_tokenizer(tokenizer, where)
        dtype = torch.float32 if float32 else stored_dtype(where)
        return AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs), tokenizer

    return _from_pretrained(source, load)


def local_checkpoint(source: ModelSource) -> tuple[Path, object]:
    """(checkpoint directory, tokenizer) of a causal LM whose weights are read from safetensors shards rather than
    loaded: the asset's converted checkpoint, or model.path."""
    if source.asset is not None:
        return converted_checkpoint(source.asset), gguf_tokenizer(source.asset)
    where = model_directory(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, trust_remote_code=source.trust_remote_code)
    except LOAD_ERRORS as err:
        raise load_error(where, err) from None
    check_tokenizer(tokenizer, where)
    return Path(where), tokenizer


def source_fingerprint(source: ModelSource) -> str:
    """A content hash of the model's config and weights, so caches notice when the model changes."""
    where = model_directory(source)
    if source.hub_id is not None:
        return hashlib.sha256(f"{source.hub_id}@{source.revision}".encode()).hexdigest()
    digest = hashlib.sha256(json.dumps({"num_labels": source.num_labels}).encode())
    for name in sorted(p.name for p in Path(where).iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".txt")):
        digest.update(name.encode())
        digest.update(hashlib.sha256((Path(where) / name).read_bytes()).digest())
    return digest.hexdigest()


GGUF_FILES = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def _check_gguf_asset(asset: str) -> None:
    if asset not in GGUF_FILES:
        raise RecipeError(f"no causal-LM loader for asset {asset!r}; causal-LM assets: {', '.join(GGUF_FILES)}")


def gguf_tokenizer(asset: str):
    """The tokenizer of a GGUF decoder asset, always read from the GGUF file: one saved with `save_pretrained` and
    reloaded maps spaces to <|endoftext|>."""
    _check_gguf_asset(asset)
    directory, gguf = model_directory(ModelSource(asset=asset)), GGUF_FILES[asset]
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    except LOAD_ERRORS as err:
        raise load_error(directory / gguf, err) from None
    check_tokenizer(tokenizer, directory / gguf)
    return tokenizer


def converted_checkpoint(asset: str) -> Path:
    """The directory of a GGUF decoder asset's float32 safetensors checkpoint, converted once into the cache.

    De-quantizing the GGUF takes ~30 s, so it is done once; a damaged cache entry is rebuilt from the verified GGUF.
    """
    _check_gguf_asset(asset)
    directory, gguf = model_directory(ModelSource(asset=asset)), GGUF_FILES[asset]
    converted = cache_root() / "converted" / asset
    if (converted / "config.json").is_file():
        try:
            check_weights(converted, f"converted {asset!r} cache")
        except RecipeError as err:
            print(f"warning: {err}; converting {gguf} again", file=sys.stderr)
            shutil.rmtree(converted)
    if not (converted / "config.json").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
        except LOAD_ERRORS as err:
            raise load_error(directory / gguf, err) from None
        converted.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=converted.parent, prefix=f".{asset}."))
        try:
            model.save_pretrained(staging, safe_serialization=True)
            os.rename(staging, converted)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return converted


def load_causal_lm(asset: str):
    """(model, tokenizer) of a GGUF decoder asset, in fp32 and eval mode (`converted_checkpoint`, `gguf_tokenizer`)."""
    tokenizer = gguf_tokenizer(asset)
    converted = converted_checkpoint(asset)
    try:
        model = AutoModelForCausalLM.from_pretrained(converted, local_files_only=True, dtype=torch.float32)
    except LOAD_ERRORS as err:
        raise load_error(converted, err) from None
    return model.eval(), tokenizer
