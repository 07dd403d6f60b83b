"""Turn pytest-benchmark JSON files into a Markdown table of ratios and a PNG chart.

    python -m benchmarks.suites.report out.json [ipex.json ...] [--md table.md] [--png chart.png] [--note TEXT]

Several JSON files (e.g. one from the main environment and one from the IPEX environment) are read together;
every figure says which environment (torch version) produced it. Ratios:

* pruned/dense: the pruned model's median latency over the median of the dense calls interleaved with it (the
  dense model runs once before each timed round of the pruned one), so both sides saw the same machine load;
* backend/eager: a backend's median over eager fp32's median for the same model and shape, from the same JSON file
  (separate benchmarks, run minutes apart: less robust to load changes than the interleaved ratio).

A bf16 figure is labelled AMX only when oneDNN's kernels in that environment used an AMX ISA; otherwise the
machine section says "no AMX".
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.studies.common import empty_figure, save_figure
from inc_plugins.perf.backends import BACKENDS
from inc_plugins.atomic import write_text

VARIANT_ORDER = ("dense", "slim40", "wanda50", "wanda2:4")
VARIANT_LABELS = {"dense": "dense", "slim40": "slimmed, 40% FLOPs removed (mask search)",
                  "wanda50": "Wanda 50% unstructured", "wanda2:4": "Wanda 2:4"}
PRUNER_ORDER = ("magnitude", "wanda", "sparse_gpt", "mask_search")


@dataclass
class Source:
    path: Path
    machine: dict
    benchmarks: list[dict]
    started: str

    @property
    def torch(self) -> str:
        return self.machine.get("cpu_features", {}).get("torch", "unknown torch")

    @property
    def label(self) -> str:
        return f"{self.path.name} (torch {self.torch})"


def load(paths: list[Path]) -> list[Source]:
    sources = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"error: cannot read benchmark JSON {path}: {error}") from None
        if not {"machine_info", "benchmarks"} <= data.keys():
            raise SystemExit(f"error: {path} is not a pytest-benchmark JSON file (no machine_info/benchmarks); "
                             f"write one with --benchmark-json")
        sources.append(Source(path, data["machine_info"], data["benchmarks"], data.get("datetime", "")))
    return sources


def _one_per_environment(sources: list[Source]) -> list[Source]:
    """The first source of each torch version: files from one environment share one machine description."""
    firsts: dict[str, Source] = {}
    for source in sources:
        firsts.setdefault(source.torch, source)
    return list(firsts.values())


def _suite(source: Source, suite: str) -> list[dict]:
    return [b for b in source.benchmarks if b.get("extra_info", {}).get("suite") == suite]


def _median_s(benchmark: dict) -> float:
    return benchmark["stats"]["median"]


def pruned_over_dense(benchmark: dict) -> float | None:
    """Median latency over the median of the interleaved dense calls; None for dense itself."""
    dense = benchmark["extra_info"].get("interleaved_dense_median_seconds")
    return _median_s(benchmark) / dense if dense else None


def amx_used(source: Source) -> bool:
    """Whether any probed oneDNN (torch's, or IPEX's own build) ran an AMX kernel in this environment."""
    cpu = source.machine.get("cpu_features", {})
    return any((cpu.get(probe) or {}).get("amx_used") for probe in ("onednn", "onednn_ipex"))


def dtype_label(dtype: str, source: Source) -> str:
    if dtype != "bf16":
        return dtype
    return "bf16 (AMX)" if amx_used(source) else "bf16 (no AMX)"


# -------------------------------------------------------------------------------------------------------- tables


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}" if seconds >= 0.01 else f"{1000 * seconds:.3f}"


def machine_section(sources: list[Source], note: str | None) -> list[str]:
    lines = ["## Machine", ""]
    for source in _one_per_environment(sources):
        cpu = source.machine.get("cpu_features")
        if not cpu:
            lines += [f"- {source.label}: no CPU features recorded (was benchmarks/conftest.py loaded?)"]
            continue
        flags = cpu["flags"]
        onednn = cpu.get("onednn") or {}
        kernels = ", ".join(f"{k['primitive']} {k['src_dtype']}: {k['implementation']}" for k in onednn.get("kernels", [])
                            if k["primitive"] != "reorder") or "not probed"
        lines += [
            f"**torch {source.torch}** ({', '.join(s.path.name for s in sources if s.torch == source.torch)}), "
            f"run {source.started}",
            "",
            "| | |",
            "|---|---|",
            f"| CPU | {cpu['cpu_model']}, {cpu['logical_cpus']} logical CPUs, "
            f"{cpu['physical_cores'] or 'unknown'} physical cores |",
            f"| torch threads | {cpu['torch_threads']} (torch {cpu['torch']}, ATen CPU capability "
            f"{cpu['torch_cpu_capability']}) |",
            "| CPU flags | " + ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in flags.items()) + " |",
            f"| oneDNN | {onednn.get('version', '?')}, detected ISA: {onednn.get('isa_info', '?')} |",
            f"| oneDNN kernels of the probe | {kernels} |",
            *([f"| IPEX's own oneDNN | {ipex['version']}: " + ", ".join(
                f"{k['primitive']} {k['src_dtype']}: {k['implementation']}" for k in ipex["kernels"]
                if k["primitive"] != "reorder") + " |"] if (ipex := cpu.get("onednn_ipex")) else []),
            f"| AMX | {cpu['amx_summary']} |",
        ]
        for same_env in (s for s in sources if s.torch == source.torch):
            if (load := same_env.machine.get("load_average")) and load.get("at_start"):
                lines.append(f"| load average (1/5/15 min), {same_env.path.name} | at start "
                             f"{', '.join(f'{v:.2f}' for v in load['at_start'])}; "
                             f"at end {', '.join(f'{v:.2f}' for v in load['at_end'])} |")
        lines.append("")
    if not any(amx_used(s) for s in sources):
        lines += ["**No AMX**: no figure below ran on AMX tiles; bf16 figures ran on AVX512-BF16 kernels where "
                  "the CPU has them.", ""]
    if note:
        lines += [note, ""]
    return lines


def backends_section(sources: list[Source]) -> list[str]:
    lines = ["## Backends", "", "| backend | environment | available | settings, or why not |", "|---|---|---|---|"]
    seen = set()
    for source in sources:
        for backend_id, info in source.machine.get("backends", {}).items():
            if (backend_id, source.torch) in seen:
                continue
            seen.add((backend_id, source.torch))
            detail = (json.dumps(info["settings"]) if info["available"] else info["reason"]).replace("|", "\\|")
            lines.append(f"| {backend_id} | torch {source.torch} | {'yes' if info['available'] else '**no**'} | "
                         f"{detail} |")
    return lines + [""]


def _inference_rows(source: Source) -> dict:
    """{(backend, batch, seq): {variant: benchmark}} in run order."""
    rows: dict = {}
    for benchmark in _suite(source, "inference"):
        info = benchmark["extra_info"]
        rows.setdefault((info["backend"], info["batch"], info["seq_len"]), {})[info["variant"]] = benchmark
    return rows


def inference_section(sources: list[Source]) -> list[str]:
    lines = ["## Inference latency: pruned / dense (median ms; ratio to the interleaved dense calls, < 1 is faster)",
             "", "| backend | environment | batch x seq | " + " | ".join(VARIANT_LABELS[v] for v in VARIANT_ORDER) +
             " | dense sequences/s |", "|---|---|---|" + "---|" * (len(VARIANT_ORDER) + 1)]
    for source in sources:
        for (backend, batch, seq), variants in _inference_rows(source).items():
            dtype = next(iter(variants.values()))["extra_info"]["dtype"]
            cells = []
            for variant in VARIANT_ORDER:
                benchmark = variants.get(variant)
                if benchmark is None:
                    cells.append("-")
                    continue
                ratio = pruned_over_dense(benchmark)
                cells.append(_ms(_median_s(benchmark)) + (f" ({ratio:.2f})" if ratio else ""))
            dense = variants.get("dense")
            throughput = f"{batch / _median_s(dense):.0f}" if dense else "-"
            lines.append(f"| {backend.rsplit('-', 1)[0]} {dtype_label(dtype, source)} | torch {source.torch} | "
                         f"{batch} x {seq} | " + " | ".join(cells) + f" | {throughput} |")
    return lines + [""]


def backend_vs_eager_section(sources: list[Source]) -> list[str]:
    lines = ["## Backend / eager fp32 (same model and shape, same environment, separate benchmarks; < 1 is faster)", "",
             "| backend | environment | batch x seq | " + " | ".join(VARIANT_ORDER) + " |",
             "|---|---|---|" + "---|" * len(VARIANT_ORDER)]
    for source in sources:
        eager_rows = {key: variants for s in sources if s.torch == source.torch
                      for key, variants in _inference_rows(s).items() if key[0] == "eager-fp32"}
        for (backend, batch, seq), variants in _inference_rows(source).items():
            eager = eager_rows.get(("eager-fp32", batch, seq))
            if backend == "eager-fp32" or not eager:
                continue
            cells = [f"{_median_s(variants[v]) / _median_s(eager[v]):.2f}" if v in variants and v in eager else "-"
                     for v in VARIANT_ORDER]
            dtype = next(iter(variants.values()))["extra_info"]["dtype"]
            lines.append(f"| {backend.rsplit('-', 1)[0]} {dtype_label(dtype, source)} | torch {source.torch} | "
                         f"{batch} x {seq} | " + " | ".join(cells) + " |")
    return lines + [""]


def pruning_cost_section(sources: list[Source]) -> list[str]:
    lines = ["## Cost of pruning (same model and calibration data)", "",
             "| pruner | environment | model | calibration samples | median s | peak RSS increase MB |",
             "|---|---|---|---|---|---|"]
    for source in sources:
        found = {b["extra_info"]["pruner"]: b for b in _suite(source, "pruning_cost")}
        for pruner in sorted(found, key=lambda p: PRUNER_ORDER.index(p) if p in PRUNER_ORDER else 99):
            info = found[pruner]["extra_info"]
            lines.append(f"| {pruner} | torch {source.torch} | {info['model'].split(',')[0]} | "
                         f"{info['calibration_samples']} | {_median_s(found[pruner]):.2f} | "
                         f"{info['peak_rss_increase_mb']:.0f} |")
    return lines + [""]


def sparse_matmul_section(sources: list[Source]) -> list[str]:
    lines = ["## torch.sparse CSR matmul vs dense (fp32; ratio to the interleaved dense calls, < 1 is faster)", "",
             "| weight @ activations | environment | sparsity | CSR median ms | dense median ms | CSR / dense |",
             "|---|---|---|---|---|---|"]
    for source in sources:
        for benchmark in sorted(_suite(source, "sparse_matmul"),
                                key=lambda b: (b["extra_info"]["tokens"], b["extra_info"]["sparsity"])):
            info = benchmark["extra_info"]
            if info["variant"] != "csr":
                continue
            (out_f, in_f), tokens = info["weight_shape"], info["tokens"]
            lines.append(f"| [{out_f}x{in_f}] @ [{in_f}x{tokens}] | torch {source.torch} | {100 * info['sparsity']:.0f}% | "
                         f"{_ms(_median_s(benchmark))} | {_ms(info['interleaved_dense_median_seconds'])} | "
                         f"{pruned_over_dense(benchmark):.2f} |")
    return lines + [""]


def markdown(sources: list[Source], note: str | None = None) -> str:
    lines = ["# Pruning benchmarks", "", "Sources: " + ", ".join(s.label for s in sources), ""]
    lines += machine_section(sources, note)
    lines += backends_section(sources)
    for section in (inference_section, backend_vs_eager_section, pruning_cost_section, sparse_matmul_section):
        body = section(sources)
        if len(body) > 5:  # title, blank, header, rule, blank: nothing measured otherwise
            lines += body
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- chart


def _chart_shape(sources: list[Source]) -> tuple[int, int] | None:
    """The shape measured on the most backends (the largest among ties): the chart's one shape."""
    backends_at: dict[tuple[int, int], set] = {}
    for source in sources:
        for benchmark in _suite(source, "inference"):
            info = benchmark["extra_info"]
            backends_at.setdefault((info["batch"], info["seq_len"]), set()).add((source.torch, info["backend"]))
    return max(backends_at, key=lambda shape: (len(backends_at[shape]), shape[0] * shape[1])) if backends_at else None


def chart(sources: list[Source], path: Path) -> None:
    """Top: pruned-vs-dense speedup per backend at the largest shape. Bottom: CSR/dense matmul ratios and the
    cost of pruning, where the JSON has them."""
    shape = _chart_shape(sources)
    csr = [(s, b) for s in sources for b in _suite(s, "sparse_matmul") if b["extra_info"]["variant"] == "csr"]
    costs = [(s, b) for s in sources for b in _suite(s, "pruning_cost")]
    bottom = [panel for panel, data in (("csr", csr), ("costs", costs)) if data]
    if not shape and not bottom:
        raise SystemExit("error: nothing to chart: the JSON holds no inference, sparse-matmul or pruning-cost benchmarks")
    rows = (1 if shape else 0) + (1 if bottom else 0)
    fig = empty_figure(figsize=(14, 5.5 * rows))
    grid = fig.add_gridspec(rows, max(len(bottom), 1))
    if shape:
        _inference_panel(fig.add_subplot(grid[0, :]), sources, shape)
    for column, panel in enumerate(bottom):
        ax = fig.add_subplot(grid[rows - 1, column])
        _csr_panel(ax, csr) if panel == "csr" else _costs_panel(ax, costs)
    cpu = sources[0].machine.get("cpu_features", {})
    amx = "AMX used" if any(amx_used(s) for s in sources) else "no AMX"
    fig.suptitle(f"{cpu.get('cpu_model', '?')}, {cpu.get('torch_threads', '?')} threads, {amx}", fontsize=12)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _costs_panel(ax, costs: list[tuple[Source, dict]]) -> None:
    ordered = sorted(costs, key=lambda c: PRUNER_ORDER.index(c[1]["extra_info"]["pruner"])
                     if c[1]["extra_info"]["pruner"] in PRUNER_ORDER else 99)
    names = [b["extra_info"]["pruner"] for _, b in ordered]
    seconds = [_median_s(b) for _, b in ordered]
    bars = ax.bar(names, seconds, color="#7f7f7f")
    for bar, (_, benchmark) in zip(bars, ordered):
        ax.annotate(f"{bar.get_height():.1f} s\n+{benchmark['extra_info']['peak_rss_increase_mb']:.0f} MB",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")
    model = ordered[0][1]["extra_info"]["model"].split(",")[0].split(" (")[0]
    samples = max(b["extra_info"]["calibration_samples"] for _, b in ordered)
    ax.set_ylabel("pruning wall time (s, median)")
    ax.set_title(f"Cost of pruning {model}, {samples} calibration samples (labels: time, peak RSS increase)",
                 fontsize=10)
    ax.margins(y=0.25)
    ax.grid(axis="y", alpha=0.3)


def _inference_panel(ax, sources: list[Source], shape: tuple[int, int]) -> None:
    """Speedup of each pruned variant over the dense calls interleaved with it, per backend, at one shape;
    backends grouped by environment, in the registry's order."""
    environments, order = list(dict.fromkeys(s.torch for s in sources)), list(BACKENDS)
    rows = sorted(((source, key, variants) for source in sources for key, variants in _inference_rows(source).items()
                   if key[1:] == shape),
                  key=lambda row: (environments.index(row[0].torch),
                                   order.index(row[1][0]) if row[1][0] in order else len(order)))
    groups = []  # (label, {variant: benchmark})
    for source, (backend, _, _), variants in rows:
        dtype = next(iter(variants.values()))["extra_info"]["dtype"]
        dense = f"\ndense {1000 * _median_s(variants['dense']):.0f} ms" if "dense" in variants else ""
        env = f"\ntorch {source.torch.split('+')[0]}" if len(environments) > 1 else ""
        name = backend.rsplit("-", 1)[0].replace("inductor-", "inductor\n")
        groups.append((f"{name}\n{dtype_label(dtype, source)}{dense}{env}", variants))
    present = [v for v in VARIANT_ORDER[1:] if any(v in g for _, g in groups)]
    width = 0.8 / max(len(present), 1)
    colors = {"slim40": "#1f77b4", "wanda50": "#ff7f0e", "wanda2:4": "#2ca02c"}
    for i, variant in enumerate(present):
        points = [(g, 1 / ratio) for g, (_, variants) in enumerate(groups)
                  if variant in variants and (ratio := pruned_over_dense(variants[variant]))]
        if not points:
            continue
        xs, speedups = zip(*points)
        bars = ax.bar([x + (i - (len(present) - 1) / 2) * width for x in xs], speedups, width,
                      label=VARIANT_LABELS[variant], color=colors[variant])
        for bar, speedup in zip(bars, speedups):
            ax.annotate(f"{speedup:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="dense (1x)")
    ax.set_xticks(range(len(groups)), [label for label, _ in groups], fontsize=8)
    ax.set_ylabel("speedup over dense (dense latency / pruned latency)")
    ax.set_title(f"Pruned vs dense, batch {shape[0]} x {shape[1]} tokens (interleaved medians; > 1 is faster)",
                 fontsize=10)
    ax.set_ylim(0, 1.3 * max([bar.get_height() for bar in ax.patches] + [1.0]))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=4)


def _csr_panel(ax, csr: list[tuple[Source, dict]]) -> None:
    by_shape: dict[str, list] = {}
    for _, benchmark in csr:
        info = benchmark["extra_info"]
        (out_f, in_f), tokens = info["weight_shape"], info["tokens"]
        by_shape.setdefault(f"[{out_f}x{in_f}] @ [{in_f}x{tokens}]", []).append(
            (100 * info["sparsity"], pruned_over_dense(benchmark)))
    for label, points in by_shape.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("weight sparsity (%)")
    ax.set_ylabel("CSR latency / dense latency (< 1: CSR faster)")
    ax.set_title("torch.sparse CSR matmul vs dense, fp32", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suites.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json)")
    parser.add_argument("--md", type=Path, help="write the Markdown here (default: print it)")
    parser.add_argument("--png", type=Path, help="write the chart here")
    parser.add_argument("--note", help="a sentence added under the machine table (e.g. how busy the machine was)")
    args = parser.parse_args(argv)
    sources = load(args.json)
    text = markdown(sources, args.note)
    if args.md:
        write_text(args.md, text + "\n")
    else:
        print(text)
    if args.png:
        chart(sources, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
