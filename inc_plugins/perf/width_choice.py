"""Which FFN width multiple suits this machine, read from a latency table measured at every width of a range
(``width_multiple: auto`` of ``mask_search``; ``python -m inc_plugins.latency_table measure --neuron-widths``).

Criterion. A kernel that prefers widths of 64 is about as fast at 1024 neurons as at 1000: its latency is a
staircase that sits below the straight line through it at each preferred width and above it just after. So a
straight line is fitted (least squares) to the latency over the table's longest run of consecutive measured
widths, and the score of a candidate m is 1 + the mean of ``latency(w) - line(w)`` over the multiples w of m in
the run, divided by the run's mean latency: 1 for every m when the latency has no steps (the line takes up the
fixed cost that makes wide layers cheaper per neuron, so it favours no m), below 1 for the step size and its
multiples when it has them. The
smallest candidate is the default, and a larger m replaces the current choice only when its score is lower by more
than ``tolerance`` (a fraction): a coarser width costs the search importance, so it has to buy measurable speed.
The run must hold at least 2M + 1 widths, M the largest candidate, so that M has three multiples in it. The
latencies are the medians timed before the table's nondecreasing fit (``measured_neuron_seconds``) where the table
has them: that fit would average a step away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .latency_table import LatencyTable

__all__ = ["CANDIDATE_MULTIPLES", "TOLERANCE", "WidthChoice", "choose_width_multiple"]

CANDIDATE_MULTIPLES = (1, 8, 16, 32, 64)
TOLERANCE = 0.01  # a larger multiple must sit more than 1% further below the fitted line


@dataclass(frozen=True)
class WidthChoice:
    """The chosen multiple, each candidate's score (1 + its multiples' mean latency above the fitted line, as a
    fraction of the mean latency) and the run of widths scored."""

    multiple: int
    scores: dict[int, float]
    widths: tuple[int, int]  # the first and last width of the run


def _longest_run(table: LatencyTable) -> dict[int, float]:
    """The table's timed latency at each width of its longest run of consecutive measured widths (>= 1); the
    first run among equally long ones."""
    seconds = table.measured_neuron_seconds or [table.neuron_latency[width] for width in table.measured_neurons]
    timed = {width: latency for width, latency in zip(table.measured_neurons, seconds) if width >= 1}
    best: dict[int, float] = {}
    for start in sorted(w for w in timed if w - 1 not in timed):
        run, width = {}, start
        while width in timed:
            run[width], width = timed[width], width + 1
        if len(run) > len(best):
            best = run
    return best


def choose_width_multiple(table: LatencyTable, candidates: tuple[int, ...] = CANDIDATE_MULTIPLES,
                          tolerance: float = TOLERANCE) -> WidthChoice:
    """The width multiple for ``table``'s FFN by the module's criterion; candidates that do not divide the table's
    FFN width are left out. Raises ValueError when the table was not measured at every width of a long enough run."""
    n_neurons = len(table.neuron_latency) - 1
    usable = sorted(m for m in set(candidates) if m >= 1 and n_neurons % m == 0 and 2 * m + 1 <= n_neurons)
    if not usable or not 0 <= tolerance < 1:
        raise ValueError(f"need candidate multiples m that divide the FFN width {n_neurons} (at least 2m + 1) and a "
                         f"tolerance in [0, 1), got {candidates} and {tolerance}")
    largest = usable[-1]
    run = _longest_run(table)
    if len(run) < 2 * largest + 1:
        first = largest // 2 or 1
        raise ValueError(
            f"width_multiple 'auto' needs a latency table measured at every FFN width of a run of at least "
            f"{2 * largest + 1} (`python -m inc_plugins.latency_table measure --neuron-widths {first}:{first + 4 * largest}`"
            f"); this one's longest run of consecutive measured widths holds {len(run)}")
    widths = torch.tensor(list(run), dtype=torch.float64)
    latency = torch.tensor(list(run.values()), dtype=torch.float64)
    design = torch.stack([torch.ones_like(widths), widths], dim=1)
    line = design @ torch.linalg.lstsq(design, latency.unsqueeze(1)).solution.squeeze(1)
    mean = float(latency.mean())
    if mean <= 0:
        raise ValueError("the latency table's timed FFN latencies average 0 seconds or less over its measured run: "
                         "they hold no measurement to choose a width multiple from")
    above = dict(zip(run, ((latency - line) / mean).tolist()))
    scores = {m: 1 + sum(above[w] for w in run if w % m == 0) / sum(1 for w in run if w % m == 0) for m in usable}
    chosen = usable[0]
    for m in usable[1:]:
        if scores[m] < scores[chosen] * (1 - tolerance):
            chosen = m
    return WidthChoice(chosen, scores, (min(run), max(run)))
