"""Synthetic (random-weight) Llama checkpoints of any size, written block by block, never held whole in memory.

For measuring memory and time of streaming pruning at LLM scale (e.g. a 7B-shaped model, ~13.5 GB in bf16) on a
machine that could not hold it: the weights are random, so such a model says nothing about quality. Each tensor is
drawn from its own generator (seed, tensor index), so a checkpoint depends only on the arguments.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import LlamaConfig

from inc_plugins.models.safetensors_checkpoint import ShardedCheckpointWriter

__all__ = ["LLAMA_7B_SHAPE", "write_synthetic_llama_checkpoint"]

# Llama-2-7B's layout with Llama-3-style grouped-query attention: the 7B shape issue #15 measures
LLAMA_7B_SHAPE = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "intermediate_size": 14336, "vocab_size": 32000}

INIT_STD = 0.02  # transformers' initializer_range for Llama


def _block_shapes(config: LlamaConfig, index: int) -> dict[str, tuple[int, ...]]:
    hidden, ffn = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    prefix = f"model.layers.{index}."
    return {f"{prefix}{name}": shape for name, shape in {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden), "mlp.down_proj.weight": (hidden, ffn),
    }.items()}


def _tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, number: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + number)
    return (torch.randn(shape, generator=generator) * INIT_STD).to(dtype)


def write_synthetic_llama_checkpoint(directory: str | os.PathLike, shape: dict, dtype: torch.dtype = torch.bfloat16,
                                     seed: int = 0) -> Path:
    """Write a random-weight ``LlamaForCausalLM`` checkpoint of ``shape`` (LlamaConfig keys) into the new directory
    ``directory``: one shard per block plus one for the embeddings, final norm and LM head, the index and
    ``config.json``. Peak memory is one block in float32. Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True)
    config = LlamaConfig(**shape, tie_word_embeddings=False, dtype=str(dtype).removeprefix("torch."))
    blocks = config.num_hidden_layers
    writer = ShardedCheckpointWriter(directory, blocks + 1)
    number = 0
    for index in range(blocks):
        tensors = {}
        for name, tensor_shape in _block_shapes(config, index).items():
            tensors[name] = _tensor(name, tensor_shape, dtype, seed, number)
            number += 1
        writer.write_shard(index + 1, tensors)
        del tensors
    rest = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size), "model.norm.weight": (config.hidden_size,),
            "lm_head.weight": (config.vocab_size, config.hidden_size)}
    writer.write_shard(blocks + 1, {name: _tensor(name, s, dtype, seed, number + i) for i, (name, s) in enumerate(rest.items())})
    writer.write_index()
    config.save_pretrained(directory)
    (directory / "SYNTHETIC.txt").write_text(
        "Random weights (inc_plugins.perf.synthetic_checkpoint): for measuring memory and time only, never quality.\n"
        + json.dumps({"shape": shape, "dtype": str(dtype), "seed": seed}) + "\n")
    return directory
