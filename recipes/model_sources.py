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
