"""The benchmark suites' options: what they select, and bad values stopped with the allowed choices."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _collect(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks/suites/test_inference.py", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "--bench-scale", "tiny", *options],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_grid_backends_and_variants_select_the_cases_in_group_order():
    done = _collect("--bench-grid", "8x128,1x64", "--bench-backends", "eager-fp32", "--bench-variants", "dense,slim40")
    assert done.returncode == 0, done.stderr[-2000:]
    ids = [line.split("[", 1)[1].rstrip("]") for line in done.stdout.splitlines() if line.startswith("benchmarks/")]
    # tiny scale: sequence 128 -> 32 and 64 -> 16 (its model has 64 positions)
    assert ids == ["eager-fp32-b8xs32-dense", "eager-fp32-b8xs32-slim40", "eager-fp32-b1xs16-dense",
                   "eager-fp32-b1xs16-slim40"]


@pytest.mark.parametrize("option, value, message", [
    ("--bench-grid", "32by128", "use full, small, or shapes like 32x128"),
    ("--bench-backends", "eager-fp16", "choose from eager-fp32"),
    ("--bench-variants", "slim40", "'dense' is required"),
    ("--bench-time", "soon", "--bench-time takes seconds"),
])
def test_bad_option_values_are_refused_with_the_choices(option, value, message):
    done = _collect(option, value)
    assert done.returncode != 0
    assert message in done.stderr + done.stdout
