"""What a person reads after a run: the before/after table (terminal and summary.md) and a per-layer sparsity plot."""

from pathlib import Path

from inc_plugins.atomic import write_text
from inc_plugins.inc import one_shot

# {split}: the examples the task evaluates on (report["evaluated_on"]: dev sentences, test images, ...)
METRIC_LABELS = {"accuracy": "{split} accuracy", "f1": "{split} F1", "perplexity": "perplexity"}


def comparison_rows(report: dict) -> list[tuple[str, str, str]]:
    """(quantity, before, after) for the metrics, parameter counts and MACs of a report."""
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    split = report.get("evaluated_on", "dev")
    rows = [(label.format(split=split), f"{before[key]:.4f}", f"{after[key]:.4f}")
            for key, label in METRIC_LABELS.items() if key in before]
    params = report["parameters"]
    rows += [("parameters", f"{params['before']['total']:,}", f"{params['after']['total']:,}"),
             ("non-zero parameters", f"{params['before']['nonzero']:,}", f"{params['after']['nonzero']:,}")]
    if report.get("macs"):
        macs = report["macs"]
        rows.append((f"head+FFN MACs @{macs['seq_len']} tok", f"{macs['before']:,}", f"{macs['after']:,}"))
    if report.get("weights_on_disk_bytes"):
        size = report["weights_on_disk_bytes"]
        rows.append(("weights on disk (MB)", f"{size['before'] / 1e6:.1f}", f"{size['after'] / 1e6:.1f}"))
    benchmark = report.get("benchmark") or {}
    shape = benchmark.get("inputs", {})
    for backend, timing in benchmark.get("backends", {}).items():
        if timing["available"]:
            rows.append((f"{backend} ms/batch of {shape['batch_size']}x{shape['seq_len']} "
                         f"({timing['speedup']:.2f}x faster)", f"{1000 * timing['dense_seconds']:.1f}",
                         f"{1000 * timing['pruned_seconds']:.1f}"))
    return rows


def terminal_table(report: dict) -> str:
    rows = comparison_rows(report)
    width = max(len(label) for label, _, _ in rows) + 2
    lines = [f"{'':{width}}{'before':>16}{'after':>16}"]
    lines += [f"{label:{width}}{b:>16}{a:>16}" for label, b, a in rows]
    return "\n".join(lines)


def _stage_line(stage: dict) -> str:
    settings = stage["settings"]
    if "mode" not in stage:  # a classic method on the image task: its own procedure, settings as given
        shown = ", ".join(f"{key} {value}" for key, value in settings.items()
                          if key != "pruning_type" and not isinstance(value, dict))
        return f"- `{settings['pruning_type']}`: {shown}"
    what = f"`{settings['pruning_type']}` to {settings['target_sparsity']:g}"
    if settings["pruning_type"] not in one_shot.structured_types():  # (whole heads and neurons: no pattern)
        what += f" ({settings.get('pattern')})"
    how = (f"{stage['calibration_samples']} calibration samples" if stage["mode"] == "one-shot"
           else f"{stage['training_steps']} training steps")
    line = f"- {what}, {stage['mode']}, {how}, {stage['prune_seconds']:.1f} s"
    checks = (stage.get("mask_search") or {}).get("step_checks") or []
    if checks:
        line += (f"; step checks (the dense model's top-1 predictions repeated on its {checks[0]['samples']} "
                 f"least-sure calibration samples): " + ", ".join(
                     f"{check['step']} {'kept' if check['kept'] else 'dropped'} ({check['agreement_without']} -> "
                     f"{check['agreement_with']} of {check['positions']})" for check in checks))
    if "retrain" in stage:
        tuned = stage["retrain"]
        line += f"; then retrained {tuned['steps']} steps with the pruned weights held at zero, {tuned['seconds']:.1f} s"
    return line


def markdown_summary(report: dict, plot_name: str | None) -> str:
    lines = [f"# Run of recipe `{report['recipe']}`", "", f"Started {report['started']}.", ""]
    if report.get("description"):
        lines += [report["description"].strip(), ""]
    stages = report["pruning_stages"]
    searched = [i for i, stage in enumerate(stages) if stage["settings"]["pruning_type"] in one_shot.structured_types()]
    lines += ["## Stages", ""]
    for index, stage in enumerate(stages):
        lines.append(_stage_line(stage))
        if report["model"]["slimmed"] and searched and index == searched[-1]:
            lines.append("- slimmed: the pruned heads and FFN neurons physically removed")
    lines += ["", "## Before and after", "", "| | before | after |", "|---|---:|---:|"]
    lines += [f"| {label} | {b} | {a} |" for label, b, a in comparison_rows(report)]
    sparsity = report["layer_sparsity"]
    if sparsity and not _slimmed_without_zeros(report):
        values = list(sparsity.values())
        lines += ["", f"Per-layer sparsity over {len(values)} layers: min {min(values):.3f}, "
                      f"mean {sum(values) / len(values):.3f}, max {max(values):.3f}."]
    elif sparsity:
        lines += ["", "No weight is zero: the pruned heads and neurons were removed, not zeroed (the plot shows how "
                      "many each block kept)."]
    benchmark = report.get("benchmark")
    if benchmark:
        shape = benchmark["inputs"]
        lines += ["", f"Latency: median of {benchmark['rounds']} rounds that time dense and pruned alternately, "
                      f"{benchmark['threads']} threads, a batch of {shape['batch_size']} x {shape['seq_len']} random "
                      f"token ids (seeded)."]
        for backend, timing in benchmark["backends"].items():
            if timing.get("calibrated_on"):
                lines[-1] += f" {backend}: both models quantized to int8, calibrated on {timing['calibrated_on']}."
    if plot_name:
        lines += ["", f"![heads and neurons kept, per-layer sparsity]({plot_name})"]
    if report.get("export"):
        lines += _export_lines(report)
    if report.get("quantize"):
        lines += _quantize_lines(report)
    seconds = report["stage_seconds"]
    lines += ["", "## Time", "", "| stage | seconds |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    lines += ["", "## Load the model", "", "```python", report["model"]["load"], "```", ""]
    return "\n".join(lines)


def _export_lines(report: dict) -> list[str]:
    """The OpenVINO IR section: where it is, its precision, and how it compares with the PyTorch model."""
    export, split = report["export"], report.get("evaluated_on", "dev")
    check = export["check"]
    megabytes = sum(export["bytes"].values()) / 1e6
    lines = ["", "## OpenVINO IR", "",
             f"`{export['directory']}/openvino_model.xml` (+ .bin, {megabytes:.1f} MB in all), inference precision "
             f"{export['precision']} (OpenVINO runs it at {export['runs_at']} here). Run beside the PyTorch model on the "
             f"same {split} batches ({check['batches']}): largest logit difference {check['max_abs_diff']:.3g}, "
             f"{check['relative_diff']:.2g} of the largest logit (tolerance {check['tolerance']['relative_logits']:g}).",
             "", "| | PyTorch | OpenVINO IR | difference |", "|---|---:|---:|---:|"]
    for name, metric in check["metrics"].items():
        label = METRIC_LABELS.get(name, name).format(split=split)
        lines.append(f"| {label} | {metric['pytorch']:.4f} | {metric['candidate']:.4f} | {metric['difference']:+.4f} |")
    return lines + ["", "```python", export["load"], "```"]


QUANTIZERS = {"nncf": "OpenVINO IR, int8 (NNCF)", "inc": "PyTorch, int8 (INC 3.7.1)"}


def _quantize_lines(report: dict) -> list[str]:
    """The int8 section: each quantizer's metric beside the float PyTorch model's, and the pruned zeros it kept."""
    quantize, split = report["quantize"], report.get("evaluated_on", "dev")
    methods = quantize["methods"]
    lines = ["", "## int8 (static post-training quantization)", "",
             f"Calibrated on {quantize['calibration_samples']} samples (seed {quantize['seed']}), evaluated on the "
             f"{split} beside the float PyTorch model.", "",
             "| model | metric | float PyTorch | int8 | difference | pruned zeros kept | max logit diff |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for method, result in methods.items():
        if not result["ran"]:
            lines.append(f"| {QUANTIZERS[method]} | failed: {result['error']} | | | | | |")
            continue
        check, zeros = result["check"], result["pruned_zeros"]
        kept = f"{zeros['zeros_kept']:,} of {zeros['zeros']:,}" if zeros["zeros"] else "(no zero weights)"
        for name, metric in check["metrics"].items():
            label = METRIC_LABELS.get(name, name).format(split=split)
            lines.append(f"| {QUANTIZERS[method]} | {label} | {metric['pytorch']:.4f} | {metric['candidate']:.4f} | "
                         f"{metric['difference']:+.4f} | {kept} | {check['max_abs_diff']:.3g} |")
    outside = [f"{QUANTIZERS[m]}: {'; '.join(r['check']['failures'])}" for m, r in methods.items()
               if r["ran"] and not r["check"]["within_tolerance"]]
    if outside:
        lines += ["", "Outside the int8 tolerance: " + " / ".join(outside) + "."]
    if methods.get("nncf", {}).get("ran"):
        lines += ["", "```python", methods["nncf"]["load"], "```"]
    return lines


def _slimmed_without_zeros(report: dict) -> bool:
    """A slimmed model whose layers hold no zero weights: per-layer sparsity would be a column of zeros."""
    return report["model"]["slimmed"] and not any(report["layer_sparsity"].values())


def _searched_structure(report: dict) -> dict | None:
    """The last structured stage's summary (kept heads and neurons per layer: mask_search's, or flap's, wanda_sp's,
    structured_magnitude's), or None."""
    searched = [stage.get("mask_search") or stage["structure"] for stage in report["pruning_stages"]
                if stage.get("mask_search") or stage.get("structure")]
    return searched[-1] if searched else None


def plot_run(report: dict, path: Path) -> None:
    """Per-layer sparsity (a horizontal bar per layer, in model order) and, after a structured stage, the
    attention heads and FFN neurons kept in each block next to it; written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file only
    import matplotlib.pyplot as plt

    sparsity, structure = report["layer_sparsity"], _searched_structure(report)
    names, values = list(sparsity), list(sparsity.values())
    height = min(60.0, max(3.0, 0.16 * len(names) + 1.2))
    zeros_panel = structure is None or not _slimmed_without_zeros(report)
    if structure is None:
        figure, axes = plt.subplots(figsize=(8, height))
    elif zeros_panel:
        figure, (heads, neurons, axes) = plt.subplots(
            1, 3, figsize=(14, max(height, 4.0)), gridspec_kw={"width_ratios": [1, 1, 2]})
    else:  # slimmed: nothing is zero, the kept heads and neurons are the whole story
        figure, (heads, neurons) = plt.subplots(1, 2, figsize=(9, max(0.5 * len(structure["kept_heads"]) + 1.5, 3.0)))
        for panel, kept, total, what in ((heads, structure["kept_heads"], structure["heads_per_layer"], "heads"),
                                         (neurons, structure["kept_neurons"], structure["neurons_per_layer"],
                                          "FFN neurons")):
            blocks = range(len(kept))
            panel.barh(blocks, [total] * len(kept), color="lightgray", label="removed")
            panel.barh(blocks, kept, color="tab:green", label="kept")
            panel.set_yticks(list(blocks), [f"block {b}" for b in blocks])
            panel.invert_yaxis()
            panel.set_xlim(0, total)
            panel.set_xlabel(f"{what} kept of {total}")
            panel.set_title(f"{what} kept")
        heads.legend(loc="lower right", fontsize=7)
    if zeros_panel:
        axes.barh(range(len(names)), values, color="tab:blue")
        axes.set_yticks(range(len(names)), names, fontsize=max(3, min(8, 400 / max(1, len(names)))))
        axes.invert_yaxis()
        axes.set_xlim(0, 1)
        axes.set_xlabel("fraction of zero weights")
        axes.set_title(f"{report['recipe']}: per-layer sparsity")
        axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    staging = path.with_name(f".{path.name}.partial.png")
    figure.savefig(staging, dpi=100)
    plt.close(figure)
    staging.replace(path)


def write_summary(report: dict, directory: Path) -> None:
    """summary.md and sparsity.png into `directory`."""
    plot = "sparsity.png" if report["layer_sparsity"] else None
    if plot:
        plot_run(report, directory / plot)
    write_text(directory / "summary.md", markdown_summary(report, plot))
