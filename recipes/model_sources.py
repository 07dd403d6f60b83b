"""Loads the model and tokenizer a recipe names: an offline asset, a local directory, or (only when named) a hub id."""

import hashlib
import json
from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from inc_plugins.assets import ASSETS, AssetError, asset_path

from .schema import ModelSource, RecipeError


def model_directory(source: ModelSource) -> Path | str:
    if source.asset is not None:
        try:
            return asset_path(source.asset)
        except AssetError as err:
            raise RecipeError(str(err)) from None
    if source.path is not None:
        if not (source.path / "config.json").is_file():
            raise RecipeError(f"model.path {str(source.path)!r} is not a model directory (no config.json in it)")
        return source.path
    return source.hub_id


def load_classifier(source: ModelSource):
    """(model, tokenizer) for sequence classification with `num_labels` outputs, in eval mode."""
    where = model_directory(source)
    local = source.hub_id is None
    kwargs = {"revision": source.revision, "trust_remote_code": source.trust_remote_code, "local_files_only": local}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForSequenceClassification.from_pretrained(where, num_labels=source.num_labels, **kwargs)
    except OSError as err:
        if local:
            raise RecipeError(f"cannot load the model in {where}: {err}") from None
        raise RecipeError(
            f"cannot reach hub model {source.hub_id!r} (is this machine offline?). "
            f"Offline recipes use model.asset, one of: {', '.join(ASSETS)}"
        ) from None
    return model.eval(), tokenizer


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


def load_causal_lm(asset: str):
    """(model, tokenizer) of a GGUF decoder asset, in fp32 and eval mode.

    De-quantizing the GGUF takes ~30 s, so the fp32 weights are saved once as safetensors in the cache. The tokenizer
    is always read from the GGUF file: one saved with `save_pretrained` and reloaded maps spaces to <|endoftext|>.
    """
    import os
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from inc_plugins.assets import cache_root

    if asset not in GGUF_FILES:
        raise RecipeError(f"no causal-LM loader for asset {asset!r}; causal-LM assets: {', '.join(GGUF_FILES)}")
    directory, gguf = model_directory(ModelSource(asset=asset)), GGUF_FILES[asset]
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    converted = cache_root() / "converted" / asset
    if not (converted / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
        converted.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=converted.parent, prefix=f".{asset}."))
        try:
            model.save_pretrained(staging, safe_serialization=True)
            os.rename(staging, converted)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(converted, local_files_only=True, dtype=torch.float32)
    return model.eval(), tokenizer
