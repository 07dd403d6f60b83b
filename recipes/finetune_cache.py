"""Fine-tunes a model without a task head once, and reuses the result while nothing that shaped it changed."""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from inc_plugins.assets import cache_root

from .schema import DataSource, FineTune, ModelSource
from .model_sources import source_fingerprint

# Format 2: the new task head is drawn from the fine-tune's seed (format 1 drew it from whatever state torch's
# global RNG was in), so no format-1 entry is the fine-tune a recipe now asks for.
CACHE_FORMAT = 2


def _data_identity(data: DataSource) -> dict:
    identity = data.model_dump(mode="json")
    if data.files is not None:  # the content, not just the name, shapes the weights
        files = [data.files.train] + ([data.files.dev] if data.files.dev is not None else [])
        identity["files_sha256"] = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files]
    return identity


def finetune_key(source: ModelSource, data: DataSource, finetune: FineTune) -> str:
    """Hash of everything the fine-tuned weights depend on: model content, data split, hyper-parameters."""
    identity = {
        "format": CACHE_FORMAT,
        "model": source_fingerprint(source),
        "data": _data_identity(data),
        "finetune": finetune.model_dump(mode="json"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def cached_dir(key: str) -> Path:
    return cache_root() / "finetuned" / key


def load_cached(key: str):
    """(model, tokenizer, metadata) from the cache, or None when absent."""
    directory = cached_dir(key)
    if not (directory / "finetune.json").is_file():
        return None
    model = AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer, json.loads((directory / "finetune.json").read_text())


def store(key: str, model, tokenizer, metadata: dict) -> Path:
    """Saves atomically: a concurrent or interrupted run never sees a half-written cache entry."""
    final = cached_dir(key)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}."))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "finetune.json").write_text(json.dumps(metadata, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return final
