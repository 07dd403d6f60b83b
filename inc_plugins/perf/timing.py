"""The interleaved timer: candidates compared by latency are timed in turn, round after round.

On a machine that other work shares, load comes and goes in phases of seconds. Timing candidate A for a while and
then candidate B would let a slow phase land on one of them; timing each once per round, in an order that rotates
every round, spreads every phase over all of them, so their ratio stays fair even when their absolute times do not.
Every latency comparison of the project uses this: the latency tables (one call per layer size), the recipes'
benchmark stage (dense vs pruned), the studies (dense vs slimmed models) and, through ``ReferenceBetweenRounds``,
the pytest-benchmark suites (pytest-benchmark times the candidate, the reference runs before each of its rounds).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def seconds_of(call: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``call`` (``time.perf_counter``)."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def interleaved_seconds(calls: Sequence[Callable[[], object]], warmup: int, repeats: int) -> list[list[float]]:
    """Seconds of every timed call of each of ``calls``: first ``warmup`` untimed calls of each (in order), then
    ``repeats`` rounds that time every call once, starting one further along the list each round. Returns one list
    of ``repeats`` samples per call, in the order of ``calls``."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for call in calls:
        for _ in range(warmup):
            call()
    samples: list[list[float]] = [[] for _ in calls]
    for round_index in range(repeats):
        for offset in range(len(calls)):
            index = (round_index + offset) % len(calls)
            samples[index].append(seconds_of(calls[index]))
    return samples


def interleaved_median_seconds(calls: Sequence[Callable[[], object]], warmup: int, repeats: int) -> list[float]:
    """The median of each call's samples from ``interleaved_seconds``."""
    return [statistics.median(samples) for samples in interleaved_seconds(calls, warmup, repeats)]


def median_ratio(reference: Sequence[float], candidate: Sequence[float]) -> float:
    """The median over rounds of reference / candidate, for samples of ``interleaved_seconds`` paired by round: a
    speedup from which a slow phase of the machine that hits a whole round cancels, where a ratio of the two
    medians keeps it when the slow rounds are not the same for both."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"need samples paired by round, got {len(reference)} and {len(candidate)}")
    return statistics.median(r / c for r, c in zip(reference, candidate))


def summary(samples: Sequence[float]) -> dict:
    """{median_s, min_s, max_s, q1_s, q3_s, repeats} of timed samples in seconds (quartiles: the median when there
    is one sample)."""
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "q1_s": quartiles[0], "q3_s": quartiles[2], "repeats": len(samples)}


class ReferenceBetweenRounds:
    """A reference call timed once before every round of another timer: pass the instance as pytest-benchmark's
    ``setup=`` and it times ``reference`` (e.g. the dense model) between the candidate's timed rounds, so the two
    medians compare calls interleaved in time. With ``reference=None`` it does nothing (the candidate is the
    reference itself)."""

    def __init__(self, reference: Callable[[], object] | None):
        self.reference = reference
        self.seconds: list[float] = []

    def __call__(self) -> None:
        if self.reference is not None:
            self.seconds.append(seconds_of(self.reference))

    def after_warmup(self, warmup: int) -> list[float]:
        """The samples taken before the timed rounds (the first ``warmup`` ran before warm-up rounds)."""
        return self.seconds[warmup:]

    def median_after_warmup(self, warmup: int) -> float | None:
        timed = self.after_warmup(warmup)
        return statistics.median(timed) if timed else None
