"""The interleaved timer and the peak-memory measure of inc_plugins.perf (what they record, not how fast)."""

import time

import pytest
import torch

from inc_plugins.perf import memory
from inc_plugins.perf.memory import PeakRss
from inc_plugins.perf.timing import ReferenceBetweenRounds, interleaved_seconds, median_ratio, summary


def test_every_call_is_timed_once_per_round_in_rotated_order():
    order = []
    samples = interleaved_seconds([lambda i=i: order.append(i) for i in range(2)], warmup=0, repeats=3)
    assert order == [0, 1, 1, 0, 0, 1]
    assert [len(s) for s in samples] == [3, 3] and all(t >= 0 for s in samples for t in s)
    with pytest.raises(ValueError, match="repeats >= 1"):
        interleaved_seconds([lambda: None], warmup=0, repeats=0)


def test_summary_of_samples():
    stats = summary([3.0, 1.0, 2.0, 4.0, 5.0])
    assert (stats["median_s"], stats["min_s"], stats["max_s"], stats["repeats"]) == (3.0, 1.0, 5.0, 5)
    assert stats["q1_s"] <= stats["median_s"] <= stats["q3_s"]
    assert summary([0.5]) == {"median_s": 0.5, "min_s": 0.5, "max_s": 0.5, "q1_s": 0.5, "q3_s": 0.5, "repeats": 1}


def test_median_ratio_pairs_samples_by_round():
    # a model 2x faster; slow phases (x3) hit rounds 2 and 5 whole and the dense sample of round 3 only: the
    # ratio of medians says 6x, the paired ratios 2x in four rounds of five
    dense, pruned = [2.0, 6.0, 6.0, 2.0, 6.0], [1.0, 3.0, 1.0, 1.0, 3.0]
    assert summary(dense)["median_s"] / summary(pruned)["median_s"] == 6.0
    assert median_ratio(dense, pruned) == 2.0
    assert median_ratio([4.0, 6.0, 12.0], [2.0, 2.0, 2.0]) == 3.0
    with pytest.raises(ValueError, match="paired by round"):
        median_ratio([1.0, 2.0], [1.0])


def test_a_reference_between_rounds_is_timed_before_each_round():
    calls = []
    reference = ReferenceBetweenRounds(lambda: calls.append("dense"))
    for _ in range(4):
        reference()
    assert calls == ["dense"] * 4 and len(reference.after_warmup(1)) == 3
    assert reference.median_after_warmup(1) >= 0
    nothing = ReferenceBetweenRounds(None)
    nothing()
    assert nothing.seconds == [] and nothing.median_after_warmup(1) is None


def _hold(megabytes: int) -> None:
    block = torch.ones(megabytes * 2**20 // 4)  # touched pages: resident
    time.sleep(0.05)
    del block


@pytest.mark.parametrize("high_water_mark", [True, False], ids=["high-water-mark", "sampled"])
def test_peak_rss_sees_memory_held_only_inside_the_block(high_water_mark, monkeypatch):
    if not high_water_mark:
        monkeypatch.setattr(memory, "_reset_high_water_mark", lambda: False)
    elif not memory._reset_high_water_mark():
        pytest.skip("/proc/self/clear_refs cannot be written here: only the sampled measure runs")
    with PeakRss() as peak:
        _hold(64)
    assert peak.method == ("high-water mark" if high_water_mark else "sampled every 2 ms")
    assert peak.increase_mb >= 48 and peak.peak_mb >= peak.before_mb + 48
