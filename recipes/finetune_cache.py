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

CACHE_FORMAT = 1


def finetune_key(source: ModelSource, data: DataSource, finetune: FineTune) -> str:
    """Hash of everything the fine-tuned weights depend on: model content, data split, hyper-parameters."""
    identity = {
        "format": CACHE_FORMAT,
        "model": source_fingerprint(source),
        "data": data.model_dump(mode="json"),
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
