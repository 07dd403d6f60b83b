"""Progress of the phases that take seconds or more (Fisher pass, mask tuning, sequential calibration, training).

On a terminal the bar moves as the work does. When the output is a file or a pipe (CI, nohup, a job scheduler) a
live bar would write a line per update, so the bar is refreshed at most once every ``LOG_INTERVAL_S`` seconds.
"""

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def progress(iterable: Iterable | None = None, *, desc: str, unit: str, total: int | None = None,
             leave: bool = False) -> tqdm:
    """A tqdm bar over `iterable` (or one updated by hand with `total`), counted in `unit`s that mean something:
    samples, blocks, steps."""
    terminal = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr,
                mininterval=0.1 if terminal else LOG_INTERVAL_S, maxinterval=max(10.0, LOG_INTERVAL_S))
