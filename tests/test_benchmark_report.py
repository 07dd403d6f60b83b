"""The benchmark report: ratios from pytest-benchmark JSON, AMX labelling, and the chart file."""

import json
from pathlib import Path

import pytest

from benchmarks.suites.report import load, main, markdown
from inc_plugins.perf.machine import amx_summary, parse_cpuinfo
from inc_plugins.perf.onednn import parse_onednn_verbose

DATA = Path(__file__).parent / "data"


def _machine(cpuinfo: str, onednn: str, torch_version: str) -> dict:
    cpu = parse_cpuinfo((DATA / cpuinfo).read_text())
    verbose = parse_onednn_verbose((DATA / onednn).read_text())
    return {"cpu_features": {**cpu, "torch": torch_version, "torch_threads": 2, "torch_cpu_capability": "AVX512",
                             "onednn": verbose, "amx_summary": amx_summary(cpu, verbose)},
            "backends": {"eager-fp32": {"available": True, "reason": "torch", "dtype": "fp32", "settings": {}},
                         "ipex-fp32": {"available": False, "reason": "intel_extension_for_pytorch is not installed",
                                       "dtype": "fp32", "settings": {}}},
            "load_average": {"at_start": [1.0, 1.0, 1.0], "at_end": [2.0, 1.5, 1.0], "logical_cpus": 2}}


def _inference(backend: str, dtype: str, variant: str, median: float, dense_interleaved: float | None) -> dict:
    return {"group": f"inference {backend} b32xs128", "name": f"test_inference[{backend}-{variant}]",
            "stats": {"median": median},
            "extra_info": {"suite": "inference", "backend": backend, "dtype": dtype, "variant": variant,
                           "batch": 32, "seq_len": 128, "interleaved_dense_median_seconds": dense_interleaved}}


def _write(path: Path, machine: dict, benchmarks: list[dict]) -> Path:
    path.write_text(json.dumps({"machine_info": machine, "benchmarks": benchmarks, "datetime": "2026-11-25T03:30:00"}))
    return path


@pytest.fixture
def results(tmp_path) -> Path:
    benchmarks = [
        _inference("eager-fp32", "fp32", "dense", 0.100, None),
        _inference("eager-fp32", "fp32", "slim40", 0.070, 0.105),   # interleaved dense was slower than dense's own run
        _inference("eager-fp32", "fp32", "wanda50", 0.101, 0.100),
        _inference("eager-bf16", "bf16", "dense", 0.050, None),
        _inference("eager-bf16", "bf16", "slim40", 0.040, 0.050),
        {"group": "csr", "name": "test_csr_matmul[csr-90]", "stats": {"median": 0.002},
         "extra_info": {"suite": "sparse_matmul", "variant": "csr", "sparsity": 0.9, "weight_shape": [1536, 384],
                        "tokens": 4096, "interleaved_dense_median_seconds": 0.004}},
        {"group": "pruning cost minilm", "name": "test_pruning_cost[wanda]", "stats": {"median": 5.0},
         "extra_info": {"suite": "pruning_cost", "pruner": "wanda", "model": "MiniLM-L6, fine-tuned",
                        "calibration_samples": 128, "peak_rss_increase_mb": 210.4}},
    ]
    return _write(tmp_path / "out.json", _machine("cpuinfo_amd_epyc_2core_this_machine.txt",
                                                 "onednn_verbose_amd_epyc_2core_this_machine.txt", "2.13.0+cpu"),
                  benchmarks)


def test_ratios_come_from_interleaved_dense_calls_and_eager(results):
    text = markdown(load([results]))
    assert "| eager fp32 | torch 2.13.0+cpu | 32 x 128 | 100.0 | 70.0 (0.67) | 101.0 (1.01) | - | 320 |" in text
    # backend/eager: 0.040 / 0.070 for the slimmed model, 0.050 / 0.100 dense
    assert "| eager bf16 (no AMX) | torch 2.13.0+cpu | 32 x 128 | 0.50 | 0.57 | - | - |" in text
    assert "| [1536x384] @ [384x4096] | torch 2.13.0+cpu | 90% | 2.000 | 4.000 | 0.50 |" in text
    assert "| wanda | torch 2.13.0+cpu | MiniLM-L6 | 128 | 5.00 | 210 |" in text
    assert "| ipex-fp32 | torch 2.13.0+cpu | **no** | intel_extension_for_pytorch is not installed |" in text


def test_without_amx_the_report_says_so_and_never_labels_amx(results):
    text = markdown(load([results]))
    assert "no AMX (CPU flags lack amx_tile, amx_bf16, amx_int8)" in text
    assert "**No AMX**" in text
    assert "(AMX)" not in text


def test_bf16_is_labelled_amx_only_where_onednn_used_amx(tmp_path):
    amx = _write(tmp_path / "spr.json", _machine("cpuinfo_xeon_8480_sapphire_rapids_written.txt",
                                                 "onednn_verbose_xeon_8480_sapphire_rapids_written.txt", "2.8.0"),
                 [_inference("eager-bf16", "bf16", "dense", 0.02, None)])
    text = markdown(load([amx]))
    assert "eager bf16 (AMX)" in text and "**No AMX**" not in text
    assert "AMX used by oneDNN kernels" in text


def test_command_writes_markdown_and_a_png(results, tmp_path):
    assert main([str(results), "--md", str(tmp_path / "table.md"), "--png", str(tmp_path / "chart.png"),
                 "--note", "Shared machine."]) == 0
    assert "Shared machine." in (tmp_path / "table.md").read_text()
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_file_that_is_not_benchmark_json_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(SystemExit, match="not a pytest-benchmark JSON file"):
        load([bad])
    with pytest.raises(SystemExit, match="cannot read benchmark JSON"):
        load([tmp_path / "missing.json"])


def test_amx_seen_only_by_ipexs_own_onednn_still_labels_bf16_amx(tmp_path):
    machine = _machine("cpuinfo_xeon_8480_sapphire_rapids_written.txt",
                       "onednn_verbose_amd_epyc_2core_this_machine.txt", "2.8.0")
    machine["cpu_features"]["onednn_ipex"] = parse_onednn_verbose(
        (DATA / "onednn_verbose_xeon_8480_sapphire_rapids_written.txt").read_text())
    text = markdown(load([_write(tmp_path / "ipex.json", machine, [_inference("ipex-bf16", "bf16", "dense", 0.02, None)])]))
    assert "ipex bf16 (AMX)" in text
    assert "IPEX's own oneDNN | v3.7.1: matmul bf16: brg_matmul:avx512_core_amx" in text
