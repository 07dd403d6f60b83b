"""Latency lookup tables: shapes, interpolation, files, and the machine check (timings themselves are not asserted)."""

import json
import os
from pathlib import Path

import pytest
import torch

from inc_plugins import latency_table as lt
from inc_plugins.perf import layer_latency, timing
from tests.fixtures.tiny_models import tiny_bert_classifier, tiny_llama_lm

QUICK = dict(batch_size=2, seq_len=8, repeats=2, warmup=1)


@pytest.fixture(autouse=True)
def one_thread():
    # intra-op threads that spin on a shared 2-core machine make tiny timings erratic
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INC_PLUGINS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bert_table():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield lt.measure_latency_table(tiny_bert_classifier(), neuron_step=32, **QUICK)
    torch.set_num_threads(previous)


def test_bert_table_has_one_entry_per_kept_count(bert_table):
    assert len(bert_table.head_latency) == 4 + 1
    assert len(bert_table.neuron_latency) == 64 + 1
    assert all(v >= 0 for v in bert_table.head_latency + bert_table.neuron_latency)
    assert bert_table.head_latency[0] > 0  # an emptied layer still runs its residuals and LayerNorms
    assert bert_table.neuron_latency[0] == 0.0
    assert bert_table.measured_heads == [0, 1, 2, 3, 4]
    assert bert_table.measured_neurons == [0, 32, 64]
    # unmeasured neuron counts lie on the line between their measured neighbours
    low, high = bert_table.neuron_latency[32], bert_table.neuron_latency[64]
    assert bert_table.neuron_latency[48] == pytest.approx((low + high) / 2)
    assert bert_table.machine == lt.current_machine("eager", 2, 8)
    assert bert_table.model["num_heads"] == 4 and bert_table.model["intermediate_size"] == 64


def test_measured_tables_never_fall_as_units_are_added(bert_table):
    assert bert_table.head_latency == sorted(bert_table.head_latency)
    assert bert_table.neuron_latency == sorted(bert_table.neuron_latency)


def test_nondecreasing_fit_is_the_least_squares_monotone_sequence():
    assert layer_latency.nondecreasing_fit([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]
    assert layer_latency.nondecreasing_fit([5, 1, 3]) == [3, 3, 3]
    assert layer_latency.nondecreasing_fit([0, 1, 1, 2]) == [0, 1, 1, 2]
    # brute force on a grid: no nondecreasing sequence of multiples of 1/4 fits [2, 0, 3, 1] better
    import itertools

    values = [2, 0, 3, 1]
    fitted = layer_latency.nondecreasing_fit(values)
    error = sum((f - v) ** 2 for f, v in zip(fitted, values))
    grid = [i / 4 for i in range(0, 13)]
    best = min(sum((c - v) ** 2 for c, v in zip(candidate, values))
               for candidate in itertools.product(grid, repeat=4) if list(candidate) == sorted(candidate))
    assert fitted == sorted(fitted) and error == pytest.approx(best)


def test_sizes_are_timed_in_rotated_interleaved_rounds():
    order = []
    calls = [lambda i=i: order.append(i) for i in range(3)]
    timing.interleaved_median_seconds(calls, warmup=1, repeats=3)
    assert order == [0, 1, 2] + [0, 1, 2, 1, 2, 0, 2, 0, 1]


def test_measuring_leaves_the_model_untouched():
    model = tiny_bert_classifier()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lt.measure_latency_table(model, neuron_step=64, **QUICK)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert model.bert.encoder.layer[0].attention.self.num_attention_heads == 4


def test_gqa_table_is_measured_in_whole_kv_groups():
    table = lt.measure_latency_table(tiny_llama_lm(), neuron_step=64, **QUICK)
    assert table.measured_heads == [0, 2, 4]  # 4 query heads in 2 key/value groups
    assert len(table.head_latency) == 5 and len(table.neuron_latency) == 65
    assert table.head_latency[1] == pytest.approx((table.head_latency[0] + table.head_latency[2]) / 2)
    assert table.model["num_kv_heads"] == 2


def test_interpolation_and_sample_points():
    assert layer_latency.sample_points(10, 4) == [0, 4, 8, 10]
    assert layer_latency.interpolate([0, 4, 8, 10], [0.0, 4.0, 4.0, 8.0], 10) == pytest.approx(
        [0, 1, 2, 3, 4, 4, 4, 4, 4, 6, 8]
    )
    with pytest.raises(ValueError, match="step must be >= 1"):
        layer_latency.sample_points(10, 0)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'tvm'; available: eager"):
        lt.measure_latency_table(tiny_bert_classifier(), backend="tvm", **QUICK)


def test_save_load_round_trip(bert_table, tmp_path):
    path = lt.save_latency_table(bert_table)
    assert path.parent == tmp_path / "cache" / "latency"
    assert path == lt.default_table_path(bert_table)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert lt.load_latency_table(path) == bert_table

    explicit = lt.save_latency_table(bert_table, tmp_path / "elsewhere" / "table.json")
    assert json.loads(explicit.read_text())["format"] == lt.FORMAT_VERSION


def test_saved_tables_get_the_permissions_of_any_new_file(bert_table, tmp_path):
    umask = os.umask(0o022)
    try:
        path = lt.save_latency_table(bert_table, tmp_path / "table.json")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_load_rejects_files_that_are_not_tables(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="not a latency table"):
        lt.load_latency_table(bad)
    bad.write_text(json.dumps({"format": lt.FORMAT_VERSION, "head_latency": [0.1, -1.0], "neuron_latency": [0, 1],
                               "machine": {}}))
    with pytest.raises(ValueError, match="head_latency must hold"):
        lt.load_latency_table(bad)


def _with_machine(table, **changes):
    return lt.LatencyTable(table.head_latency, table.neuron_latency, {**table.machine, **changes}, table.model)


def test_check_same_machine_flags_other_machines(bert_table):
    lt.check_machine(bert_table, lt.current_machine("eager", batch_size=2, seq_len=8))  # measured here: passes
    with pytest.raises(lt.LatencyTableMismatchError, match="cpu_model: table 'Some Other CPU'"):
        lt.check_machine(_with_machine(bert_table, cpu_model="Some Other CPU"), lt.current_machine("eager"))
    other_flags = {**bert_table.machine["cpu_flags"], "amx_bf16": not bert_table.machine["cpu_flags"]["amx_bf16"]}
    with pytest.raises(lt.LatencyTableMismatchError, match="cpu_flags"):
        lt.check_machine(_with_machine(bert_table, cpu_flags=other_flags), lt.current_machine("eager"))
    with pytest.raises(lt.LatencyTableMismatchError, match="num_threads"):
        lt.check_machine(_with_machine(bert_table, num_threads=64), lt.current_machine("eager"))
    with pytest.raises(lt.LatencyTableMismatchError, match="backend: table 'eager', now 'inductor'"):
        lt.check_machine(bert_table, lt.current_machine("inductor"))
    with pytest.raises(lt.LatencyTableMismatchError, match="seq_len"):
        lt.check_machine(bert_table, lt.current_machine("eager", seq_len=128))
    with pytest.warns(UserWarning, match="torch 1.0"):
        lt.check_machine(_with_machine(bert_table, torch_version="1.0"), lt.current_machine("eager"))


def test_command_line_measures_and_shows(tmp_path, capsys):
    out = tmp_path / "cli.json"
    assert lt.main(["measure", "--model", "tiny-llama", "--batch-size", "1", "--seq-len", "4", "--repeats", "1",
                    "--warmup", "0", "--neuron-step", "64", "--threads", "1", "--output", str(out)]) == 0
    table = lt.load_latency_table(out)
    assert len(table.head_latency) == 5 and table.machine["seq_len"] == 4
    assert lt.main(["show", str(out)]) == 0
    assert "matches this machine" in capsys.readouterr().out


def test_neuron_widths_are_measured_each_and_their_medians_kept_before_the_fit(tmp_path):
    out = tmp_path / "widths.json"
    assert lt.main(["measure", "--model", "tiny-bert", "--batch-size", "1", "--seq-len", "4", "--repeats", "1",
                    "--warmup", "0", "--neuron-step", "32", "--neuron-widths", "5:9", "--output", str(out)]) == 0
    table = lt.load_latency_table(out)  # the raw medians survive the file
    assert table.measured_neurons == [0, 5, 6, 7, 8, 9, 32, 64]
    assert len(table.measured_neuron_seconds) == 8 and table.measured_neuron_seconds[0] == 0.0
    # the table holds the fit of the medians (clamped at 0 and made nondecreasing), the medians stay as timed
    fitted = layer_latency.nondecreasing_fit([max(t, 0.0) for t in table.measured_neuron_seconds])
    assert [table.neuron_latency[w] for w in table.measured_neurons] == pytest.approx(fitted)
    with pytest.raises(ValueError, match=r"neuron_widths must lie in \[1, 64\] \(the FFN width\), got \[65\]"):
        lt.measure_latency_table(tiny_bert_classifier(), neuron_widths=[65], **QUICK)
    with pytest.raises(SystemExit):
        lt.main(["measure", "--model", "tiny-bert", "--neuron-widths", "9:5"])


def test_tables_written_before_the_flag_list_grew_still_load_and_match(tmp_path):
    """Format-1 tables record five CPU flags; the description now has more. Only the recorded ones are compared."""
    here = lt.current_machine("eager", 32, 128)
    old_flags = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    old = {"format": 1, "head_latency": [0.001, 0.002, 0.003], "neuron_latency": [0.0, 0.001],
           "machine": {**here, "cpu_flags": {flag: here["cpu_flags"][flag] for flag in old_flags}},
           "model": {"model_type": "bert"}, "measured_heads": [0, 1, 2], "measured_neurons": [0, 1]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    table = lt.load_latency_table(path)
    lt.check_machine(table, here)
    flipped = {**table.machine["cpu_flags"], "avx512f": not table.machine["cpu_flags"]["avx512f"]}
    with pytest.raises(lt.LatencyTableMismatchError, match="cpu_flags: table {'avx512f'"):
        lt.check_machine(_with_machine(table, cpu_flags=flipped), here)
    with pytest.warns(UserWarning, match="measured elsewhere"):
        lt.check_machine(_with_machine(table, cpu_flags=flipped), here, allow_foreign=True)


def test_the_published_minilm_table_loads():
    table = lt.load_latency_table(Path(__file__).parent.parent / "benchmarks" / "results" / "kwon_minilm_latency_table.json")
    assert len(table.head_latency) == 13 and table.machine["backend"] == "eager" and table.model


def test_a_table_reads_latencies_by_kept_counts_also_from_a_tensor():
    table = lt.LatencyTable(torch.tensor([0.0, 2.0, 3.0]), [0.0, 1.0], {"backend": "eager"})
    assert table.head_latency == [0.0, 2.0, 3.0] and table.head_latency[1] == 2.0
    kept = torch.tensor([2, 1, 2])  # per layer
    assert table.head_latency[kept].tolist() == [3.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="machine and model metadata must be dicts"):
        lt.LatencyTable([0.0, 1.0], [0.0, 1.0], machine=["not", "a", "dict"])
