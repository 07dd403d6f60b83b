"""Peak resident memory of a block of code: ``with PeakRss() as peak: ...; peak.increase_mb``.

The measure is the kernel's high-water mark of this process's resident set (``VmHWM`` in /proc/self/status), reset to
the current RSS on entry by writing 5 to /proc/self/clear_refs, so the peak is exact and belongs to the block alone.
Where that file cannot be written (some containers, non-Linux), a thread samples the RSS every ``interval_s`` instead
(a peak shorter than the interval can then be missed); ``method`` says which measure ran. The increase is the peak
minus the RSS just before the block: the block's working memory (activations it keeps, scores, Hessians), not what
the process held already. Only one ``PeakRss`` may be active at a time in a process (the reset is process-wide).
"""

from __future__ import annotations

import os
import re
import resource
import threading
import time
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATM = Path("/proc/self/statm")


def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def gib(size: int) -> str:
    """``size`` bytes for people: "1.25 GiB"."""
    return f"{size / 2**30:.2f} GiB"


def rss_bytes() -> int:
    """This process's resident set size now, in bytes (Linux: /proc/self/statm)."""
    return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (``ru_maxrss``, which Linux reports in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes() -> int:
    """Memory the kernel estimates new allocations can use without swapping (``MemAvailable`` in /proc/meminfo)."""
    match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    if match is None:
        raise OSError("/proc/meminfo has no MemAvailable")
    return int(match.group(1)) * 1024


def _reset_high_water_mark() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # Linux: resets VmHWM to the current RSS
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


class PeakRss:
    """Context manager: ``before_mb`` (RSS on entry), ``peak_mb`` (the largest RSS during the block, entry and exit
    included), ``increase_mb`` (peak - before) and ``method`` ("high-water mark" or "sampled every <interval>")."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.before = self.peak = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.before = self.peak = rss_bytes()
        if _reset_high_water_mark():
            self.method = "high-water mark"
        else:
            self.method = f"sampled every {self.interval_s * 1e3:g} ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = max(self.peak, _status_kb("VmHWM") * 1024)
        self.peak = max(self.peak, rss_bytes())

    @property
    def before_mb(self) -> float:
        return self.before / 2**20

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def increase_mb(self) -> float:
        return (self.peak - self.before) / 2**20
