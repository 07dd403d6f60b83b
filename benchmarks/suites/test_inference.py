"""Inference latency of dense vs pruned models, per backend, dtype and shape.

Benchmark group = "inference <backend-dtype> b<batch>xs<seq>", so `pytest-benchmark compare --group-by group` puts
each pruned variant next to dense on the same backend and shape. Within each pruned benchmark the dense model is
called once before every timed round (untimed by pytest-benchmark, timed by
`inc_plugins.perf.timing.ReferenceBetweenRounds` into `extra_info`), so the pruned/dense ratio the report prints
compares calls interleaved in time, fair even on a busy machine.
"""

import pytest
import torch

from inc_plugins.perf.timing import ReferenceBetweenRounds, seconds_of


def token_inputs(vocab_size: int, batch: int, seq_len: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1, vocab_size, (batch, seq_len), generator=generator),
            "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}


def test_inference(benchmark, inference_case, settings, model_variants, prepared_runners):
    backend = inference_case.backend
    if inference_case.shape is None:
        pytest.skip(f"backend {backend.id} unavailable: {backend.availability().reason}")
    (batch, seq_len), variant = inference_case.shape, inference_case.variant
    task = model_variants.task
    inputs = token_inputs(task.vocab_size, batch, seq_len)
    model, description = model_variants.get(variant)
    run, prepare_seconds = prepared_runners.get(backend, (batch, seq_len), variant, inputs)

    with torch.no_grad():
        expected = model(**inputs).logits.float()
    output = run(inputs)
    # the fastest of a few calls sets the round count: one slow first call would cut it short
    seconds_per_call = min(seconds_of(lambda: run(inputs)) for _ in range(3))

    dense_run = None if variant == "dense" else prepared_runners.get(backend, (batch, seq_len), "dense", inputs)[0]
    dense_between_rounds = ReferenceBetweenRounds(None if dense_run is None else lambda: dense_run(inputs))

    benchmark.group = f"inference {backend.id} b{batch}xs{seq_len}"
    warmup = 1
    benchmark.pedantic(run, args=(inputs,), setup=dense_between_rounds, warmup_rounds=warmup,
                       rounds=settings.rounds_for(seconds_per_call), iterations=1)
    benchmark.extra_info.update({
        "suite": "inference", "scale": settings.scale, "backend": backend.id, "backend_name": backend.name,
        "dtype": backend.dtype, "backend_settings": backend.settings, "backend_provided_by": backend.availability().reason,
        "variant": variant, "model": {**description, "provenance": task.provenance}, "batch": batch, "seq_len": seq_len,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "prepare_seconds": round(prepare_seconds, 3),
        "max_abs_logit_difference_vs_eager_fp32": (output - expected).abs().max().item(),
        "interleaved_dense_seconds": dense_between_rounds.after_warmup(warmup),
        "interleaved_dense_median_seconds": dense_between_rounds.median_after_warmup(warmup),
    })
    # a backend that computes something else is not a faster backend: bf16 and compiled kernels differ slightly
    tolerance = 0.1 if backend.dtype == "bf16" else 1e-3
    assert (output - expected).abs().max().item() <= tolerance * max(1.0, expected.abs().max().item())
