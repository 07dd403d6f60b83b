"""Performance measurement shared by the library, the recipes and the benchmarks: one idea per module.

- ``machine``: what machine a number was measured on (CPU model, topology and flags from ``/proc/cpuinfo``, torch's
  threads and ISA, the oneDNN probe, load averages);
- ``onednn``: which ISA oneDNN's kernels actually ran (its verbose output, parsed);
- ``timing``: the interleaved timer (every candidate timed once per round, in rotated order);
- ``memory``: peak resident memory of a block of code;
- ``backends``: the inference backends (eager, inductor, IPEX, OpenVINO; fp32 and bf16) behind one interface;
- ``latency_table``: the latency lookup table of one transformer layer (type, files, machine check);
- ``layer_latency``: measuring such a table on this machine;
- ``synthetic``: tiny random models and token batches, for smoke runs whose timings mean nothing.

Nothing here imports ``recipes`` or ``benchmarks``.
"""
