"""What a person reads after a run: the before/after table (terminal and summary.md) and a per-layer sparsity plot."""

from pathlib import Path

from .atomic import write_text

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
    for backend, timing in (report.get("benchmark") or {}).get("backends", {}).items():
        if timing["available"]:
            rows.append((f"{backend} ms/batch ({timing['speedup']:.2f}x)", f"{1000 * timing['dense_seconds']:.1f}",
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
    if settings["pruning_type"] not in ("mask_search",):
        what += f" ({settings.get('pattern')})"
    how = (f"{stage['calibration_samples']} calibration samples" if stage["mode"] == "one-shot"
           else f"{stage['training_steps']} training steps")
    line = f"- {what}, {stage['mode']}, {how}, {stage['prune_seconds']:.1f} s"
    if "retrain" in stage:
        tuned = stage["retrain"]
        line += f"; then retrained {tuned['steps']} steps with the pruned weights held at zero, {tuned['seconds']:.1f} s"
    return line


def markdown_summary(report: dict, plot_name: str | None) -> str:
    lines = [f"# Run of recipe `{report['recipe']}`", "", f"Started {report['started']}.", ""]
    if report.get("description"):
        lines += [report["description"].strip(), ""]
    stages = report["pruning_stages"]
    searched = [i for i, stage in enumerate(stages) if stage["settings"]["pruning_type"] == "mask_search"]
    lines += ["## Stages", ""]
    for index, stage in enumerate(stages):
        lines.append(_stage_line(stage))
        if report["model"]["slimmed"] and searched and index == searched[-1]:
            lines.append("- slimmed: the pruned heads and FFN neurons physically removed")
    lines += ["", "## Before and after", "", "| | before | after |", "|---|---:|---:|"]
    lines += [f"| {label} | {b} | {a} |" for label, b, a in comparison_rows(report)]
    sparsity = report["layer_sparsity"]
    if sparsity:
        values = list(sparsity.values())
        lines += ["", f"Per-layer sparsity over {len(values)} layers: min {min(values):.3f}, "
                      f"mean {sum(values) / len(values):.3f}, max {max(values):.3f}."]
    if plot_name:
        lines += ["", f"![per-layer sparsity]({plot_name})"]
    seconds = report["stage_seconds"]
    lines += ["", "## Time", "", "| stage | seconds |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    lines += ["", "## Load the model", "", "```python", report["model"]["load"], "```", ""]
    return "\n".join(lines)


def plot_layer_sparsity(sparsity: dict[str, float], path: Path, title: str) -> None:
    """A horizontal bar per layer, in model order; written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file only
    import matplotlib.pyplot as plt

    names, values = list(sparsity), list(sparsity.values())
    height = min(60.0, max(3.0, 0.16 * len(names) + 1.2))
    figure, axes = plt.subplots(figsize=(8, height))
    axes.barh(range(len(names)), values, color="tab:blue")
    axes.set_yticks(range(len(names)), names, fontsize=max(3, min(8, 400 / max(1, len(names)))))
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("fraction of zero weights")
    axes.set_title(title)
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
        plot_layer_sparsity(report["layer_sparsity"], directory / plot, f"{report['recipe']}: per-layer sparsity")
    write_text(directory / "summary.md", markdown_summary(report, plot))
