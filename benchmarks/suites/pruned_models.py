"""The models the suites time: one dense model and its pruned variants, pruned once and cached on disk.

Scales:

* `tiny`: the synthetic BERT of `inc_plugins.perf.synthetic` (hidden 32, 2 layers, 64 positions, random weights)
  and synthetic labelled token batches: seconds to build, for CI smoke runs; its timings mean nothing.
* `tiny-llama`: the synthetic Llama (grouped-query attention) of `inc_plugins.perf.synthetic` with synthetic
  next-token batches: the decoder path of every suite, for CI smoke runs; its timings mean nothing.
* `minilm`: MiniLM-L6 on the movie-snippet sentiment task. The fine-tuned model from the recipe machinery's cache
  when `make demo` filled it; otherwise the pretrained encoder with a seeded, untrained head (latency does not
  depend on the head's training; the provenance is recorded with every measurement).
* `smollm2`: SmolLM2-135M (the `smollm2-135m` asset, Llama architecture, de-quantized to fp32), calibrated on
  random 128-token windows of the State of the Union speeches with the next-token loss; timed as a full forward
  pass with no KV cache (prefill).

Variants (the same dense model pruned four ways; the pruned part is the transformer blocks):

* `dense`;
* `slim40`: `mask_search` (Kwon et al.) at 40% of head+FFN FLOPs removed, then physically slimmed (decoders: by
  key/value group). Search only: rearrangement keeps each layer's unit counts and tuning only rescales kept units,
  so neither changes the slimmed shapes that latency depends on, and together they cost minutes;
* `wanda50`: Wanda, unstructured 50% of the blocks' Linear weights zeroed (dense shapes), from 128 samples;
* `wanda2:4`: Wanda, 2 of every 4 consecutive input weights zeroed (dense shapes), from 128 samples.

The pruned `minilm` and `smollm2` variants are cached under `<asset cache>/benchmark-models/<variant>-<hash>/`,
keyed by the dense weights, the calibration data and the pruning settings, so a changed model or setting never
reuses a stale entry.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

import inc_plugins
from inc_plugins.algorithms.nm_mask import nm_mask
from inc_plugins.algorithms.wanda import per_output_mask
from inc_plugins.assets import cache_root
from inc_plugins.models.saving import load_slimmed, save_slimmed
from inc_plugins.perf.synthetic import (MAX_POSITIONS, VOCAB_SIZE, synthetic_bert_classifier, synthetic_llama_lm,
                                        synthetic_token_batches)
from recipes import apply, finetune_cache
from recipes.model_sources import load_causal_lm
from recipes.schema import ModelSource, load_recipe
from recipes.text_classification import tokenized_batches
from recipes.text_corpora import sotu_text, token_windows

SCALES = ("tiny", "tiny-llama", "minilm", "smollm2")
TINY_SCALES = ("tiny", "tiny-llama")  # 64 positions: the grid's sequence lengths are scaled down
VARIANTS = ("dense", "slim40", "wanda50", "wanda2:4")
# 2: mask tuning decides per sub-layer on held-out samples, so format-1 slim40 models are other masks
CACHE_FORMAT = 2
BERT_BLOCKS, LLAMA_BLOCKS = "bert.encoder.layer", "model.layers"  # module paths of the blocks every variant prunes

MINILM_RECIPE = "minilm_mask_search.yaml"
MINILM_DIR_ENV = "INC_BENCH_MINILM_DIR"  # a fine-tuned MiniLM directory to use instead of this environment's cache
MINILM_CALIBRATION_SAMPLES = 2048  # mask search's count (the recipe's, and Kwon et al.'s)
SMOLLM2_CALIBRATION = (256, 128, 8)  # windows, tokens each, windows per batch (the kwon_smollm2 study's)
# Wanda's count (Sun et al. use 128), also the pruning-cost suite's shared calibration set
PRUNING_COST_SAMPLES = {"minilm": 128, "smollm2": 128}
CALIBRATION_OF_VARIANT = {"slim40": "calibration", "wanda50": "cost_calibration", "wanda2:4": "cost_calibration"}


def pruning_settings(variant: str, blocks: str) -> dict:
    """The INC pruning config of a pruned variant; `blocks` is the module path of the model's transformer blocks."""
    if variant == "slim40":
        return {"pruning_type": "mask_search", "target_sparsity": 0.4, "constraint": "flops",
                "rearrange": False, "tune": False}
    pattern = {"wanda50": "1x1", "wanda2:4": "2:4"}[variant]
    return {"pruning_type": "wanda", "target_sparsity": 0.5, "pattern": pattern, "op_names": [blocks]}


@dataclass
class DenseTask:
    """A dense model, labelled calibration batches for pruning it, and where both came from."""

    scale: str
    model: nn.Module
    # batches of input_ids/attention_mask [batch, seq] and labels ([batch] classes, or [batch, seq] next tokens)
    calibration: list[dict]  # for mask search
    cost_calibration: list[dict]  # the first of them: Wanda's calibration, and every pruner's in the cost suite
    blocks: str  # module path of the transformer blocks, the part every variant prunes
    vocab_size: int
    max_positions: int
    provenance: dict = field(default_factory=dict)
    cache_pruned: bool = True  # keep pruned variants on disk (not worth it for the tiny model: pruned in < 1 s)


def dense_task(scale: str) -> DenseTask:
    if scale == "tiny":
        batches = synthetic_token_batches(4, 8, 32, labels="classification", seed=0)
        return DenseTask("tiny", synthetic_bert_classifier(seed=0), batches, batches, BERT_BLOCKS, VOCAB_SIZE,
                         MAX_POSITIONS, {"model": "synthetic tiny BERT (inc_plugins.perf.synthetic), random weights",
                                         "calibration": "4 synthetic batches of 8 x 32 tokens"}, cache_pruned=False)
    if scale == "tiny-llama":
        batches = synthetic_token_batches(4, 8, 32, labels="lm", seed=0)
        return DenseTask("tiny-llama", _without_kv_cache(synthetic_llama_lm(seed=0)), batches, batches, LLAMA_BLOCKS,
                         VOCAB_SIZE, MAX_POSITIONS,
                         {"model": "synthetic tiny Llama with grouped-query attention (inc_plugins.perf.synthetic), "
                                   "random weights", "calibration": "4 synthetic batches of 8 x 32 tokens"},
                         cache_pruned=False)
    if scale == "minilm":
        return _minilm_task()
    if scale == "smollm2":
        return _smollm2_task()
    raise ValueError(f"unknown model scale {scale!r}: choose from {', '.join(SCALES)}")


def _without_kv_cache(model: nn.Module) -> nn.Module:
    """One full forward pass per call (prefill), as the suites time it: no cache is built or returned."""
    model.config.use_cache = False
    return model.eval()


def finetuned_minilm_dir() -> Path | None:
    """This environment's cached fine-tuned MiniLM (the recipe machinery's fine-tune cache), or None."""
    recipe = load_recipe(MINILM_RECIPE)
    directory = finetune_cache.cached_dir(finetune_cache.finetune_key(recipe.model, recipe.data, recipe.finetune))
    return directory if (directory / "finetune.json").is_file() else None


def _minilm_task() -> DenseTask:
    recipe = load_recipe(MINILM_RECIPE)
    # The fine-tune cache is keyed by torch version, so another environment (IPEX's torch 2.8) is pointed at the
    # main environment's fine-tuned model explicitly: every backend then times the very same weights.
    shared = os.environ.get(MINILM_DIR_ENV)
    directory = Path(shared) if shared else finetuned_minilm_dir()
    if directory is not None:
        source = ModelSource(path=directory, num_labels=recipe.model.num_labels)
        model, tokenizer, train_examples, _, _ = apply.prepare_task(
            recipe.model_copy(update={"model": source, "finetune": None}))
        head = f"fine-tuned on the movie snippets ({directory})"
    else:
        torch.manual_seed(0)
        model, tokenizer, train_examples, _, _ = apply.prepare_task(recipe.model_copy(update={"finetune": None}))
        head = "UNTRAINED seeded head (no cached fine-tune: run `make demo`); latency is unaffected"
    stage = recipe.pruning[0]
    sample = random.Random(stage.seed).sample(train_examples, MINILM_CALIBRATION_SAMPLES)
    calibration = tokenized_batches(tokenizer, sample, stage.batch_size, recipe.data.max_length)
    cost = [padded_to(batch, recipe.data.max_length, tokenizer.pad_token_id) for batch in tokenized_batches(
        tokenizer, sample[: PRUNING_COST_SAMPLES["minilm"]], stage.batch_size, recipe.data.max_length)]
    return DenseTask("minilm", model.eval(), calibration, cost, BERT_BLOCKS, model.config.vocab_size,
                     model.config.max_position_embeddings,
                     {"model": f"MiniLM-L6 (minilm-l6 asset), {head}",
                      "calibration": f"{len(sample)} movie-snippet training sentences, max length "
                                     f"{recipe.data.max_length}"})


def _smollm2_task() -> DenseTask:
    model, tokenizer = load_causal_lm("smollm2-135m")
    windows, length, batch_size = SMOLLM2_CALIBRATION
    tokens = token_windows(tokenizer, sotu_text(), windows, length, seed=0)
    calibration = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()}
                   for chunk in tokens.split(batch_size)]
    cost = calibration[: PRUNING_COST_SAMPLES["smollm2"] // batch_size]
    return DenseTask("smollm2", _without_kv_cache(model), calibration, cost, LLAMA_BLOCKS, model.config.vocab_size,
                     model.config.max_position_embeddings,
                     {"model": "SmolLM2-135M-Instruct (smollm2-135m asset, Q4_1 GGUF de-quantized to fp32)",
                      "calibration": f"{windows} random windows of {length} tokens of the State of the Union "
                                     f"speeches (seed 0), next-token labels"})


def padded_to(batch: dict, length: int, pad_token_id: int) -> dict:
    """`batch` with its [batch, seq] tensors right-padded to `length` (masked out). INC 3.7.1's SparseGPT replays
    every batch through a block with the attention mask captured from one of them, which fails when batches have
    different lengths; padding them all alike lets every pruner of the cost suite see the same data."""
    padding = length - batch["input_ids"].shape[1]
    if padding < 0:
        raise ValueError(f"batch has {batch['input_ids'].shape[1]} tokens, more than the length {length} to pad to")
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    return {name: F.pad(tensor, (0, padding), value=fill[name]) if name in fill else tensor
            for name, tensor in batch.items()}


def prune(model: nn.Module, settings: dict, calibration: list[dict]) -> tuple[nn.Module, object]:
    """(`model` pruned in place by one INC config through `inc_plugins.prepare_pruning`, the pruner's result);
    mask_search results are slimmed, so the returned model is a different, smaller one."""
    pruning = inc_plugins.prepare_pruning(model, inc_plugins.pruning_config(pruning_configs=[dict(settings)]),
                                          dataloader=calibration)
    if settings["pruning_type"] == "mask_search":
        return inc_plugins.slim(model, pruning.result), pruning.result
    return model, getattr(pruning, "result", None)


def _content_key(model: nn.Module, settings: dict, calibration: list[dict]) -> str:
    # no torch version in the key: the IPEX environment (torch 2.8) must time the models the main one pruned
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "settings": settings}, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    for batch in calibration:
        for name in sorted(batch):
            digest.update(batch[name].numpy().tobytes())
    return digest.hexdigest()[:20]


def _save(model: nn.Module, variant: str, directory: Path) -> None:
    if variant == "slim40":
        save_slimmed(model, directory)
    else:
        directory.mkdir(parents=True)
        save_model(model, str(directory / "model.safetensors"))


def _load(dense: nn.Module, variant: str, directory: Path) -> nn.Module:
    if variant == "slim40":
        loaded = load_slimmed(directory)
        loaded.config.use_cache = dense.config.use_cache
        return loaded.eval()
    model = copy.deepcopy(dense)
    load_model(model, str(directory / "model.safetensors"))
    return model.eval()


def cache_dir() -> Path:
    return cache_root() / "benchmark-models"


def pruned_variant(task: DenseTask, variant: str) -> tuple[nn.Module, dict]:
    """(model, description) of one variant; with `task.cache_pruned`, from (and to) the on-disk cache."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}")
    if variant == "dense":
        return task.model, {"variant": "dense", **_size(task.model, task.blocks)}
    settings = pruning_settings(variant, task.blocks)
    calibration = getattr(task, CALIBRATION_OF_VARIANT[variant])
    samples = sum(batch["input_ids"].shape[0] for batch in calibration)
    description = {"variant": variant, "pruning": settings, "calibration_samples": samples}
    if not task.cache_pruned:
        model = prune(copy.deepcopy(task.model), settings, calibration)[0].eval()
        return model, {**description, **_size(model, task.blocks)}
    key = _content_key(task.model, settings, calibration)
    final = cache_dir() / f"{variant.replace(':', 'of')}-{key}"
    if not final.is_dir():
        model = prune(copy.deepcopy(task.model), settings, calibration)[0].eval()
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            _save(model, variant, staging / "model")
            os.replace(staging / "model", final)  # atomic: a reader never sees a half-written entry
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    model = _load(task.model, variant, final)
    return model, {**description, "cache": str(final), **_size(model, task.blocks)}


def _size(model: nn.Module, blocks: str) -> dict:
    """Parameter count and the fraction of the blocks' Linear weights that are exactly zero."""
    linears = block_linears(model, blocks)
    weights = sum(m.weight.numel() for m in linears)
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "block_linear_weights": weights, "block_linear_zero_fraction": round(zeros / max(weights, 1), 4)}


@torch.no_grad()
def magnitude_per_output(model: nn.Module, blocks: str, pattern: str = "1x1", sparsity: float = 0.5) -> nn.Module:
    """The baseline Wanda is compared with, in place: |W| ranked within each output row of every Linear in the
    blocks (pattern "1x1", `sparsity` pruned), or within each group of M consecutive inputs (pattern "N:M", N of
    every M pruned, INC's convention)."""
    for module in block_linears(model, blocks):
        scores = module.weight.abs()
        if ":" in pattern:
            n, m = (int(v) for v in pattern.split(":"))
            keep = nm_mask(scores, n, m)
        else:
            keep = per_output_mask(scores, sparsity)
        module.weight.masked_fill_(~keep, 0.0)
    return model


def block_linears(model: nn.Module, blocks: str) -> list[nn.Linear]:
    """The Linear layers inside the transformer blocks (`blocks`: their module path, e.g. "model.layers")."""
    return [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith(blocks + ".")]
