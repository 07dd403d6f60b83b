"""Inference backends (inc_plugins.perf.backends): availability is reported with a reason, and an unavailable
backend never runs or passes."""

import dataclasses
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inc_plugins.perf import backends
from inc_plugins.perf.backends import (BACKENDS, LAYER_BACKENDS, Availability, Backend, BackendUnavailable,
                                       availability_table, layer_backend, native_bf16, select_backends)
from tests.fixtures.calibration_data import token_batches
from tests.fixtures.tiny_models import tiny_bert_classifier

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_optional_packages(monkeypatch):
    """Pretend IPEX is not installed (its availability check is cached: clear it around)."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "intel_extension_for_pytorch" else real_find_spec(name, *a))
    backends._ipex_available.cache_clear()
    yield
    backends._ipex_available.cache_clear()


def test_every_backend_reports_availability_with_a_reason():
    table = availability_table()
    assert set(table) == set(BACKENDS)
    assert {"eager-fp32", "eager-bf16", "inductor-fp32", "inductor-freezing-fp32", "inductor-max-autotune-fp32",
            "ipex-fp32", "ipex-bf16", "openvino-fp32", "openvino-bf16"} <= set(table)
    for backend_id, row in table.items():
        assert isinstance(row["available"], bool) and row["reason"], backend_id
    assert table["eager-fp32"]["available"] and torch.__version__ in table["eager-fp32"]["reason"]


def test_missing_ipex_is_unavailable_with_the_way_to_get_it_and_openvino_is_a_dependency(no_optional_packages):
    table = availability_table()
    for backend_id in ("ipex-fp32", "ipex-bf16"):
        assert not table[backend_id]["available"]
        assert "make ipex-env" in table[backend_id]["reason"] and torch.__version__ in table[backend_id]["reason"]
    assert table["openvino-fp32"]["available"] and importlib.metadata.version("openvino") in table["openvino-fp32"]["reason"]
    with pytest.raises(BackendUnavailable, match="ipex-fp32 is unavailable: intel_extension_for_pytorch is not installed"):
        BACKENDS["ipex-fp32"].prepare(tiny_bert_classifier(), {})


def test_prepare_refuses_an_unavailable_backend_without_building_anything():
    built = []
    backend = Backend("imaginary", "fp32", {}, lambda: Availability(False, "no such runtime"),
                      lambda model, inputs: built.append(model))
    with pytest.raises(BackendUnavailable, match="imaginary-fp32 is unavailable: no such runtime"):
        backend.prepare(tiny_bert_classifier(), {})
    assert built == []


def test_bf16_needs_native_support():
    assert not native_bf16({"avx512f": True, "avx512_bf16": False, "amx_bf16": False}).available
    assert "emulated" in native_bf16({}).reason
    assert native_bf16({"avx512_bf16": True}).available
    assert "amx_bf16" in native_bf16({"avx512_bf16": False, "amx_bf16": True}).reason


def test_fastest_is_the_first_available_of_openvino_bf16_eager_bf16_eager_fp32(monkeypatch):
    def only(*available):
        monkeypatch.setattr(backends, "BACKENDS", {
            name: dataclasses.replace(b, check=lambda name=name: Availability(name in available, "test"))
            for name, b in BACKENDS.items()})

    only("eager-fp32", "eager-bf16", "openvino-fp32")
    assert [b.id for b in select_backends("fastest")] == ["eager-bf16"]
    only("eager-fp32", "openvino-bf16", "eager-bf16")
    assert [b.id for b in select_backends("fastest")] == ["openvino-bf16"]
    only("eager-fp32")
    assert [b.id for b in select_backends("fastest, eager-fp32")] == ["eager-fp32"]


def test_select_backends_keeps_registry_order_and_names_the_choices_on_error():
    assert [b.id for b in select_backends("eager-bf16, eager-fp32")] == ["eager-fp32", "eager-bf16"]
    assert len(select_backends("all")) == len(BACKENDS)
    with pytest.raises(ValueError, match="unknown backend.*'eager-fp16'.*choose from eager-fp32"):
        select_backends("eager-fp16")


@pytest.mark.parametrize("backend_id, tolerance", [("eager-fp32", 0.0), ("eager-bf16", 0.05), ("openvino-fp32", 1e-5)])
def test_backends_compute_the_models_logits(backend_id, tolerance, one_thread):
    if not BACKENDS[backend_id].availability().available:
        pytest.skip(f"{backend_id} unavailable here: {BACKENDS[backend_id].availability().reason}")
    model, inputs = tiny_bert_classifier(), token_batches(1, 4, 16)[0]
    with torch.no_grad():
        expected = model(**inputs).logits
    logits = BACKENDS[backend_id].prepare(model, inputs)(inputs)
    assert logits.dtype == torch.float32 and logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= tolerance


def test_an_unavailable_backend_is_reported_as_skipped_with_its_reason_never_passed(tmp_path):
    unavailable = [b for b in ("ipex-fp32", "openvino-fp32") if not BACKENDS[b].availability().available]
    if not unavailable:
        pytest.skip("every optional backend is installed in this environment: none to check the reporting with")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/suites/test_inference.py", "-p", "no:cacheprovider", "-rs",
         "--benchmark-disable", "--bench-scale", "tiny", "--bench-backends", unavailable[0]],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "1 skipped" in done.stdout and " passed" not in done.stdout
    assert f"backend {unavailable[0]} unavailable: {BACKENDS[unavailable[0]].availability().reason[:40]}" in done.stdout


def test_latency_tables_time_layers_on_registry_backends_only():
    assert "eager" in LAYER_BACKENDS
    layer = torch.nn.Linear(4, 4)
    assert layer_backend("eager", "fp32").prepare_module(layer) is layer  # eager fp32 times the module as it is
    with pytest.raises(ValueError, match="unknown backend 'tvm'; available: eager"):
        layer_backend("tvm", "fp32")
    with pytest.raises(ValueError, match="cannot time a fp16 layer"):
        layer_backend("eager", "fp16")
    with pytest.raises(BackendUnavailable, match="runs whole token models only"):
        BACKENDS["openvino-fp32"].prepare_module(layer)


@pytest.mark.parametrize("batch", [1, 3])
def test_int8_backend_times_the_quantized_model_at_the_examples_shape(batch, monkeypatch, one_thread):
    """openvino-int8-fp32 quantizes on the calibration batches it is given (else on the timed inputs) and runs at the
    example's shape; its logits stay near the float model's (int8 weights and activations)."""
    seen = []
    real = backends.quantize_ir_int8
    monkeypatch.setattr(backends, "quantize_ir_int8", lambda model, batches: seen.append(batches) or real(model, batches))
    model, inputs = tiny_bert_classifier(), token_batches(1, batch, 16)[0]
    calibration = token_batches(2, 4, 12, seed=5)
    with torch.no_grad():
        expected = model(**inputs).logits
    for given, used in ((calibration, calibration), (None, [inputs])):
        logits = BACKENDS["openvino-int8-fp32"].prepare(model, inputs, given)(inputs)
        assert logits.dtype == torch.float32 and logits.shape == expected.shape
        assert (logits - expected).abs().max().item() <= 0.25 * expected.abs().max().item()
        assert len(seen[-1]) == len(used)
        assert all(torch.equal(got["input_ids"], want["input_ids"]) for got, want in zip(seen[-1], used))
