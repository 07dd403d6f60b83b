"""The run directory: where a run may write, and how it appears.

A run writes into a hidden staging directory beside its final place. On success the staging directory is renamed
to the run directory in one step, so a run directory is always complete. On failure it is renamed to
`<run>.failed`, with a report that says which stage failed and why (and `error.txt`, the traceback): what the
earlier stages produced stays there to look at. An existing run directory is only replaced with `overwrite`, and
a run directory outside the working directory needs `allow_outside_cwd`.
"""

import contextlib
import os
import shutil
import tempfile
import traceback
from pathlib import Path

from .atomic import write_json, write_text
from .schema import RecipeError


class StageFailed(RecipeError):
    """A stage raised: the message names the stage, the error and where the partial results are."""


def check_run_dir(run_dir: Path, overwrite: bool, allow_outside_cwd: bool) -> Path:
    """The absolute run directory, or RecipeError when it may not be written."""
    run_dir = Path(run_dir).absolute()
    cwd = Path.cwd().resolve()
    if not allow_outside_cwd and not run_dir.resolve().is_relative_to(cwd):
        raise RecipeError(
            f"run directory {run_dir} is outside the working directory {cwd}; pass --allow-outside-cwd "
            f"(allow_outside_cwd=True) to write there"
        )
    if run_dir.exists() and not overwrite:
        raise RecipeError(f"run directory {run_dir} already exists; refusing to overwrite it (pass --overwrite to "
                          f"replace it, or choose another --run-dir)")
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"run directory {run_dir} exists and is not a directory")
    return run_dir


def fresh_path(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... when it is taken."""
    candidate, suffix = path, 2
    while candidate.exists():
        candidate, suffix = path.with_name(f"{path.name}-{suffix}"), suffix + 1
    return candidate


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class StagedRun:
    """The staging directory of one run, and the report it keeps up to date after every stage."""

    def __init__(self, final: Path, staging: Path):
        self.final, self.path = final, staging
        self.report: dict = {"status": "running", "completed_stages": []}
        self.current_stage: str | None = None

    def checkpoint(self) -> None:
        """Writes the report as it stands, so a later failure still shows what finished."""
        write_json(self.path / "report.json", self.report)

    def stage_done(self, name: str) -> None:
        self.report["completed_stages"].append(name)
        self.current_stage = None
        self.checkpoint()


@contextlib.contextmanager
def staged_run(final: Path, overwrite: bool = False):
    """Yields a StagedRun; `final` appears (replacing an old one only with `overwrite`) when the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.staging-"))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it owner-only
    run = StagedRun(final, staging)
    try:
        yield run
    except BaseException as error:
        failed = fresh_path(final.with_name(final.name + ".failed"))
        stage = run.current_stage or "unknown"
        run.report.update(status="failed", failed_stage=stage, error=f"{type(error).__name__}: {error}")
        with contextlib.suppress(OSError):
            run.checkpoint()
            write_text(staging / "error.txt", "".join(traceback.format_exception(error)))
        os.rename(staging, failed)
        if isinstance(error, Exception):
            message = str(error) if isinstance(error, RecipeError) else f"{type(error).__name__}: {error}"
            raise StageFailed(f"stage {stage!r} failed: {message}\npartial results and the report: {failed}") from error
        raise
    run.report["status"] = "succeeded"
    run.checkpoint()
    if final.exists():
        if not overwrite:
            failed = fresh_path(final.with_name(final.name + ".failed"))
            os.rename(staging, failed)
            raise RecipeError(f"{final} appeared while this run was working; its results are in {failed}")
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.replaced-"))
        os.rename(final, old / final.name)
        os.rename(staging, final)
        shutil.rmtree(old)
    else:
        os.rename(staging, final)
