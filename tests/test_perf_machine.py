"""The machine description's parsers (inc_plugins.perf.machine, .onednn), on recorded /proc/cpuinfo and oneDNN
verbose samples, and the description of the machine the tests run on (asserting only what no machine lacks)."""

from pathlib import Path

import pytest

from inc_plugins.perf.machine import (CPU_FLAGS, amx_summary, cpu_description, load_average, machine_description,
                                      parse_cpuinfo)
from inc_plugins.perf.onednn import parse_onednn_verbose

DATA = Path(__file__).parent / "data"
EPYC_CPUINFO = DATA / "cpuinfo_amd_epyc_2core_this_machine.txt"
EPYC_ONEDNN = DATA / "onednn_verbose_amd_epyc_2core_this_machine.txt"
SPR_CPUINFO = DATA / "cpuinfo_xeon_8480_sapphire_rapids_written.txt"
SPR_ONEDNN = DATA / "onednn_verbose_xeon_8480_sapphire_rapids_written.txt"


def test_this_machine_cpuinfo_has_avx512_bf16_and_vnni_but_no_amx():
    cpu = parse_cpuinfo(EPYC_CPUINFO.read_text())
    assert cpu["cpu_model"] == "AMD EPYC"
    assert (cpu["logical_cpus"], cpu["physical_cores"]) == (2, 2)
    assert cpu["flags"]["avx512f"] and cpu["flags"]["avx512_bf16"] and cpu["flags"]["avx512_vnni"]
    assert not any(cpu["flags"][flag] for flag in ("amx_bf16", "amx_int8", "amx_tile", "avx512_fp16"))
    assert cpu["amx"] is False


def test_sapphire_rapids_cpuinfo_has_amx_and_counts_hyperthreads_once():
    cpu = parse_cpuinfo(SPR_CPUINFO.read_text())
    assert cpu["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert (cpu["logical_cpus"], cpu["physical_cores"]) == (4, 2)
    assert all(cpu["flags"][flag] for flag in ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni",
                                               "avx512f", "avx512_fp16"))
    assert cpu["amx"] is True


def test_amx_needs_the_tile_flag_as_well_as_a_compute_flag():
    text = "processor\t: 0\nmodel name\t: X\nflags\t\t: avx512f amx_bf16 amx_int8\n"
    assert parse_cpuinfo(text)["amx"] is False
    assert parse_cpuinfo(text.replace("amx_int8", "amx_int8 amx_tile"))["amx"] is True


def test_cpuinfo_without_topology_fields_reports_unknown_cores():
    cpu = parse_cpuinfo("processor\t: 0\nflags\t\t: avx2\n\nprocessor\t: 1\nflags\t\t: avx2\n")
    assert (cpu["logical_cpus"], cpu["physical_cores"], cpu["cpu_model"]) == (2, None, "unknown")


def test_text_that_is_not_cpuinfo_is_refused():
    with pytest.raises(ValueError, match="processor"):
        parse_cpuinfo("MemTotal: 1024 kB\n")


def test_this_machine_onednn_kernels_are_avx512_bf16_not_amx():
    onednn = parse_onednn_verbose(EPYC_ONEDNN.read_text())
    assert onednn["version"] == "v3.12.0"
    assert (onednn["runtime"], onednn["threads"]) == ("OpenMP", 2)
    assert onednn["isa_info"] == "Intel AVX-512 with Intel DL Boost and bfloat16 support"
    matmuls = [k for k in onednn["kernels"] if k["primitive"] == "matmul"]
    assert [(k["implementation"], k["isa"], k["src_dtype"], k["calls"]) for k in matmuls] == [
        ("brg_matmul:avx512_core_bf16", "avx512_core_bf16", "bf16", 1)]
    conv = next(k for k in onednn["kernels"] if k["primitive"] == "convolution")
    assert (conv["isa"], conv["src_dtype"]) == ("avx512_core", "f32")
    # reorders named "jit:blk" / "jit:uni" name no ISA
    assert {k["isa"] for k in onednn["kernels"] if k["primitive"] == "reorder"} == {None}
    assert onednn["isas_used"] == ["avx512_core", "avx512_core_bf16"]
    assert onednn["amx_used"] is False


def test_sapphire_rapids_onednn_bf16_matmul_ran_on_amx():
    onednn = parse_onednn_verbose(SPR_ONEDNN.read_text())
    # the ISA text contains a comma: it must not be cut there
    assert onednn["isa_info"] == ("Intel AVX-512 with float16, Intel DL Boost and bfloat16 support and "
                                  "Intel AMX with bfloat16 and 8-bit integer support")
    assert onednn["threads"] == 4
    matmul = next(k for k in onednn["kernels"] if k["primitive"] == "matmul")
    assert (matmul["implementation"], matmul["isa"], matmul["src_dtype"]) == ("brg_matmul:avx512_core_amx",
                                                                              "avx512_core_amx", "bf16")
    assert onednn["isas_used"] == ["avx512_core", "avx512_core_amx"]
    assert onednn["amx_used"] is True


def test_onednn_2x_lines_are_read_and_calls_counted():
    line = ("dnnl_verbose,exec,cpu,inner_product,brgemm:avx512_core_amx,forward_inference,src_bf16::blocked:ab:f0 "
            "wei_bf16::blocked:AB16b64a2b:f0 dst_bf16::blocked:ab:f0,,,mb32ic384oc1536,0.05")
    onednn = parse_onednn_verbose("\n".join([line, line, "unrelated output"]))
    assert onednn["kernels"] == [{"engine": "cpu", "primitive": "inner_product", "implementation": "brgemm:avx512_core_amx",
                                  "isa": "avx512_core_amx", "src_dtype": "bf16", "calls": 2}]
    assert onednn["amx_used"] is True


def test_graph_lines_and_no_output_give_no_kernels():
    graph = ("onednn_verbose,v1,graph,exec,cpu,100002,sdp,matmul;softmax;matmul,,in0_bf16:0:strided:undef:1x12x128x32,"
             "strict,larger_partition_kernel_t,dnnl_backend,0.5")
    for text in (graph, ""):
        onednn = parse_onednn_verbose(text)
        assert (onednn["kernels"], onednn["isas_used"], onednn["amx_used"]) == ([], [], False)


def test_amx_summary_never_claims_amx_without_it():
    epyc = parse_cpuinfo(EPYC_CPUINFO.read_text())
    spr = parse_cpuinfo(SPR_CPUINFO.read_text())
    assert amx_summary(epyc, parse_onednn_verbose(EPYC_ONEDNN.read_text())) == (
        "no AMX (CPU flags lack amx_tile, amx_bf16, amx_int8)")
    assert amx_summary(spr, parse_onednn_verbose(SPR_ONEDNN.read_text())).startswith("AMX used by oneDNN kernels")
    # flags present but kernels on AVX-512 only (e.g. an old oneDNN): the summary says AMX was not used
    assert "NOT used" in amx_summary(spr, parse_onednn_verbose(EPYC_ONEDNN.read_text()))


def test_the_description_of_this_machine_records_every_flag_and_claims_none():
    cpu = cpu_description()
    assert set(cpu["flags"]) == set(CPU_FLAGS) and all(isinstance(v, bool) for v in cpu["flags"].values())
    assert cpu["cpu_model"] and cpu["logical_cpus"] >= 1
    # AMX only with the tile flag and a compute flag, whatever this machine has
    assert cpu["amx"] == (cpu["flags"]["amx_tile"] and (cpu["flags"]["amx_bf16"] or cpu["flags"]["amx_int8"]))
    described = machine_description()
    assert {"torch", "torch_threads", "torch_cpu_capability", "python", "architecture", "amx_summary"} <= set(described)
    assert described["flags"] == cpu["flags"] and "onednn" not in described  # no probe unless asked
    load = load_average()
    assert load is None or (len(load) == 3 and all(value >= 0 for value in load))
