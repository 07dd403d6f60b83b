"""What the studies measure besides accuracy: latency of several models side by side, whole-model MACs, the bytes
of weights a decode step reads, how a decode step's time splits into a fixed and a per-byte part, and when
generate() hands out each token.

Latency goes through the interleaved timer (``inc_plugins.perf.timing``): after warm-up, every round times every
model once, in an order that rotates each round, so slow phases of a shared machine hit all models alike.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from inc_plugins.perf.backends import BACKENDS
from inc_plugins.perf.machine import load_average
from inc_plugins.perf.timing import interleaved_seconds, seconds_of, summary


def compile_limits_for(n_models: int) -> None:
    """Raise dynamo's recompile limits so that `n_models` compiled forwards of one code object all compile
    (past the limit dynamo silently falls back to eager, and an inductor label would time eager)."""
    dynamo = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, limit):
            setattr(dynamo, limit, max(getattr(dynamo, limit), 4 * n_models))


@torch.no_grad()
def time_models(models: dict[str, nn.Module], backend: str, inputs: dict, warmup: int, repeats: int) -> dict:
    """{name: {median_ms, min_ms, max_ms, q1_ms, q3_ms, repeats, first_call_s, max_abs_logit_difference_vs_eager}}
    for each model on `backend` ("eager", or "inductor": one ``torch.compile`` per model, compiled by its first
    call, which is not timed in the rounds)."""
    runners, results = {}, {}
    for name, model in models.items():
        runner = model if backend == "eager" else torch.compile(model, backend="inductor")
        reference = model(**inputs).logits
        outputs = []
        first_call = seconds_of(lambda: outputs.append(runner(**inputs).logits))  # compiles on the first call
        results[name] = {"first_call_s": round(first_call, 3),
                         "max_abs_logit_difference_vs_eager": (outputs[0] - reference).abs().max().item()}
        runners[name] = runner
    samples = interleaved_seconds([lambda runner=runner: runner(**inputs) for runner in runners.values()], warmup,
                                  repeats)
    for name, seconds in zip(runners, samples):
        timed = summary(seconds)
        results[name].update(median_ms=1000 * timed["median_s"], min_ms=1000 * timed["min_s"],
                             max_ms=1000 * timed["max_s"], q1_ms=1000 * timed["q1_s"], q3_ms=1000 * timed["q3_s"],
                             repeats=timed["repeats"])
    return results


@torch.inference_mode()
def interleaved_latency(models: dict[str, nn.Module], batch: torch.Tensor, warmup: int, repeats: int) -> dict:
    """{name: {median_s, min_s, max_s, q1_s, q3_s, repeats}} of one forward pass of `batch` through each model (in
    eval mode), by the interleaved timer."""
    for model in models.values():
        model.eval()
    samples = interleaved_seconds([lambda model=model: model(batch) for model in models.values()], warmup, repeats)
    return {name: summary(seconds) for name, seconds in zip(models, samples)}


def backend_forms_latency(models: dict[str, nn.Module], backends: list[str], shapes: list, vocab_size: int,
                          warmup: int, repeats: int, calibration: list[dict] | None = None,
                          after_shape: Callable[[str], None] | None = None) -> list[dict]:
    """Every (model, backend id of ``inc_plugins.perf.backends``) form timed at each [batch, tokens] of `shapes`, on
    random token ids (one generator seeded 0, shapes in order), all forms of one shape in each round. Per shape:
    {batch, seq_len, load_average: {before, after}, timed: {(model, backend): summary + samples_s (the seconds of
    each round, in round order: paired by round across forms)}}; int8 backends quantize on
    `calibration` (default: the timed inputs). `after_shape("<batch>x<tokens>")` runs after each shape's rounds."""
    generator = torch.Generator().manual_seed(0)
    measured = []
    for batch, seq_len in shapes:
        inputs = {"input_ids": torch.randint(0, vocab_size, (batch, seq_len), generator=generator),
                  "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}
        print(f"[latency {batch} x {seq_len}] preparing {len(models) * len(backends)} runners", flush=True)
        runners = {(name, backend): BACKENDS[backend].prepare(model, inputs, calibration)
                   for name, model in models.items() for backend in backends}
        load_before = load_average()
        samples = interleaved_seconds([lambda run=runner: run(inputs) for runner in runners.values()], warmup,
                                      repeats)
        measured.append({"batch": batch, "seq_len": seq_len,
                         "load_average": {"before": load_before, "after": load_average()},
                         "timed": {key: {**summary(seconds), "samples_s": seconds}
                                   for key, seconds in zip(runners, samples)}})
        if after_shape is not None:
            after_shape(f"{batch}x{seq_len}")
    return measured


def whole_model_macs(model: nn.Module, seq_len: int) -> int:
    """MACs of one sequence through the whole model (every matmul: encoder or decoder, pooler, heads), counted by
    torch's FlopCounterMode on an eager-attention copy (it does not see inside CPU scaled_dot_product_attention)."""
    counted = copy.deepcopy(model)
    counted.set_attn_implementation("eager")
    inputs = {"input_ids": torch.ones(1, seq_len, dtype=torch.long),
              "attention_mask": torch.ones(1, seq_len, dtype=torch.long)}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        counted(**inputs)
    return counter.get_total_flops() // 2


def weight_bytes_per_token(model: nn.Module, matmul_bytes: int, embedding_bytes: int) -> int:
    """Bytes of weights one decode step reads to generate one token: every ``nn.Linear``'s weight and bias (the LM
    head included) at `matmul_bytes` per element, plus the one row of the input embedding that the lookup reads, at
    `embedding_bytes` per element. A tied input embedding is the LM head's matrix: it is counted once, as the LM head
    (read whole for the logits), plus that row. Norm weights (one vector each) and the KV cache are left out."""
    linear = sum(module.weight.numel() + (0 if module.bias is None else module.bias.numel())
                 for module in model.modules() if isinstance(module, nn.Linear))
    return linear * matmul_bytes + model.get_input_embeddings().embedding_dim * embedding_bytes


def per_token_cost_fit(seconds_per_step: list[float], weight_bytes: list[int]) -> dict:
    """Least-squares line through (weight bytes read per decode step, seconds per step) of several models on one
    backend: ``fixed_ms`` (the intercept: per-step cost that fewer weights do not shrink, e.g. Python, kernel launches,
    sampling, cache updates), ``gb_per_s`` (1 / slope: the rate at which the weights are read) and ``r2``. A fixed
    cost bounds the decode speedup below the bytes ratio, more so where weights are read faster (bf16)."""
    if len(set(weight_bytes)) < 2 or len(seconds_per_step) != len(weight_bytes):
        raise ValueError(f"need at least 2 models of different weight bytes, got {weight_bytes}")
    slope, intercept = statistics.linear_regression(weight_bytes, seconds_per_step)
    # a least-squares line's R² is the squared correlation; all-equal times lie on the (flat) line exactly
    r2 = statistics.correlation(weight_bytes, seconds_per_step) ** 2 if len(set(seconds_per_step)) > 1 else 1.0
    return {"fixed_ms": 1000 * intercept, "gb_per_s": 1e-9 / slope if slope > 0 else None, "r2": r2}


class TokenClock:
    """A ``generate(streamer=...)`` streamer that notes the time of each call: ``generate`` hands it the prompt
    before the prefill, then every new token as soon as it is chosen. So ``times[1]`` is when the prefill's token
    came out and ``times[-1]`` when the last one did: the decode steps lie between them."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def decode_steps(self) -> int:
        """Forward passes after the prefill: one per new token but the first."""
        return len(self.times) - 2

    @property
    def decode_seconds(self) -> float:
        return self.times[-1] - self.times[1]

    @property
    def prefill_seconds(self) -> float:
        return self.times[1] - self.times[0]
