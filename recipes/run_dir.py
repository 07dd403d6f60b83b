"""The run directory: where a run may write, how it appears, and what may ever be removed.

A run writes into a hidden staging directory beside its final place, inside the allowed output area. On success
the staging directory is renamed to the run directory in one step, so a run directory is always complete. On
failure or interruption (Ctrl-C, SIGTERM) it is renamed to `<run>.failed`, with a report that says which stage
stopped and why (and `error.txt`, the traceback): what the earlier stages produced stays there to look at.

Nothing is removed that this tool did not write. Every run directory ends with a marker file that lists the files
the run wrote; `overwrite` replaces only a directory whose marker is there and which holds nothing else, and never
one that holds the recipe's own inputs. A staging directory names the process that owns it, so a later run (or
`python -m recipes.apply --clean`) removes the ones whose process is gone, and says so.
"""

import contextlib
import glob
import json
import os
import shutil
import socket
import sys
import tempfile
import traceback
from collections.abc import Iterable
from pathlib import Path

from inc_plugins.atomic import write_json, write_text

from .recipe_base import RecipeError

RUN_MARKER = ".inc-plugins-run.json"  # written last into every run directory, failed ones included
STAGING_MARKER = ".inc-plugins-staging.json"  # the owner process of a staging directory
STAGING_INFIXES = (".staging-", ".replaced-")
STREAM_STAGE_PARTIALS = ".streamed_stage_*.partial"  # what `--resume` carries over (inc_plugins.prune_checkpoint's)


class StageFailed(RecipeError):
    """A stage raised: the message names the stage, the error and where the partial results are."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that a terminated run ends like an interrupted one."""


def _listing(folder: Path) -> list[str]:
    """Every file and link under `folder`, relative, in POSIX form (the marker itself excluded)."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            relative = (Path(root) / name).relative_to(folder).as_posix()
            if relative != RUN_MARKER:
                found.append(relative)
    return sorted(found)


def _refuse_to_replace(run_dir: Path) -> str | None:
    """Why `run_dir` may not be replaced, or None when it is a run directory holding only what its run wrote."""
    try:
        marker = json.loads((run_dir / RUN_MARKER).read_text(encoding="utf-8"))
        written = set(marker["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return (f"it is not a run directory written by recipes.apply (no readable {RUN_MARKER}), so --overwrite "
                f"will not remove it")
    foreign = [path for path in _listing(run_dir) if path not in written]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"it holds files its run did not write ({shown}); move them out first"
    return None


def check_run_dir(run_dir: Path, overwrite: bool, allow_outside_cwd: bool, inputs: Iterable[Path] = ()) -> Path:
    """The absolute run directory, or RecipeError when it may not be written (or, with overwrite, replaced).
    `inputs` are the files and folders the recipe reads: a run directory that holds one is never replaced."""
    run_dir = Path(run_dir).absolute()
    resolved, cwd = run_dir.resolve(), Path.cwd().resolve()
    if not allow_outside_cwd and not resolved.is_relative_to(cwd):
        raise RecipeError(
            f"run directory {run_dir} is outside the working directory {cwd}; pass --allow-outside-cwd "
            f"(allow_outside_cwd=True) to write there"
        )
    if cwd.is_relative_to(resolved):
        raise RecipeError(f"run directory {run_dir} is the working directory or holds it; a run writes a folder of "
                          f"its own: choose a new one such as runs/my-run")
    if not run_dir.exists() and not run_dir.is_symlink():
        return run_dir
    if not run_dir.is_dir() or run_dir.is_symlink():
        raise RecipeError(f"run directory {run_dir} exists and is not a directory; choose another --run-dir")
    if not overwrite:
        raise RecipeError(f"run directory {run_dir} already exists; refusing to overwrite it (pass --overwrite to "
                          f"replace it, or choose another --run-dir)")
    reason = _refuse_to_replace(run_dir)
    if reason is None:
        held = [str(path) for path in inputs if Path(path).resolve().is_relative_to(resolved)]
        reason = f"it holds this recipe's input {held[0]}" if held else None
    if reason is not None:
        raise RecipeError(f"refusing to replace {run_dir}: {reason}; choose another --run-dir")
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


def _process_start(pid: int) -> str | None:
    """The start time of a live process (clock ticks since boot), None when there is no such process. With the
    pid it tells a live owner from a new process that reuses a dead owner's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "unknown"  # no /proc: alive, start unknown
    return stat.rsplit(")", 1)[1].split()[19]


def _owned_temporary_dir(parent: Path, prefix: str) -> Path:
    """A new hidden directory in `parent` that records this process as its owner."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, 0o777 & ~_umask())  # mkdtemp makes it owner-only
    write_json(path / STAGING_MARKER, {"pid": os.getpid(), "host": socket.gethostname(),
                                       "process_start": _process_start(os.getpid())})
    return path


def _is_stale(path: Path) -> bool:
    """A staging directory of this tool whose owner process has ended."""
    try:
        owner = json.loads((path / STAGING_MARKER).read_text(encoding="utf-8"))
        pid, host, start = int(owner["pid"]), owner["host"], owner["process_start"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not ours, or being written this instant: leave it
    if host != socket.gethostname():
        return False  # a process on another machine sharing this folder may still own it
    now = _process_start(pid)
    return now is None or (now != "unknown" and start not in (None, "unknown") and now != start)


def remove_stale_staging(folder: Path) -> list[Path]:
    """Removes the staging directories in `folder` left by runs that were killed; returns them."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        if (path.name.startswith(".") and any(infix in path.name for infix in STAGING_INFIXES)
                and path.is_dir() and not path.is_symlink() and _is_stale(path)):
            shutil.rmtree(path)
            removed.append(path)
    return removed


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

    def seal(self) -> None:
        """Writes the marker that lists every file of the run: the proof that a later --overwrite may remove them."""
        (self.path / STAGING_MARKER).unlink(missing_ok=True)
        write_json(self.path / RUN_MARKER, {"written_by": "python -m recipes.apply", "status": self.report["status"],
                                            "files": _listing(self.path)})


def interrupted_stream_stages(final: Path) -> list[Path]:
    """The partial checkpoints of streamed pruning stages (`.streamed_stage_<n>.partial`) that the newest interrupted
    run of `final` left: in a `<run>.failed` directory (Ctrl-C, SIGTERM, an error) or in a staging directory whose
    process was killed. Empty when there are none."""
    runs = [path for path in final.parent.glob(f"{glob.escape(final.name)}.failed*") if path.is_dir()]
    runs += [path for path in final.parent.glob(f".{glob.escape(final.name)}.staging-*") if _is_stale(path)]
    with_stages = [path for path in runs if any(path.glob(STREAM_STAGE_PARTIALS))]
    if not with_stages:
        return []
    return sorted(max(with_stages, key=lambda path: path.stat().st_mtime).glob(STREAM_STAGE_PARTIALS))


@contextlib.contextmanager
def staged_run(final: Path, overwrite: bool = False, carry: Iterable[Path] = ()):
    """Yields a StagedRun; `final` appears (replacing an old run only with `overwrite`) when the block succeeds.
    `carry`: paths an interrupted run left (`interrupted_stream_stages`), moved into the new staging directory
    before the stale ones are removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    run = StagedRun(final, _owned_temporary_dir(final.parent, f".{final.name}.staging-"))
    for path in carry:
        os.rename(path, run.path / path.name)
    for stale in remove_stale_staging(final.parent):
        print(f"removed {stale}: the staging directory of an earlier run that was killed", file=sys.stderr)
    try:
        yield run
    except BaseException as error:
        failed = fresh_path(final.with_name(final.name + ".failed"))
        stage = run.current_stage or "unknown"
        interrupted = not isinstance(error, Exception)
        run.report.update(status="interrupted" if interrupted else "failed", failed_stage=stage,
                          error=f"{type(error).__name__}: {error}")
        with contextlib.suppress(OSError):
            run.checkpoint()
            write_text(run.path / "error.txt", "".join(traceback.format_exception(error)))
            run.seal()
        os.rename(run.path, failed)
        if interrupted:
            print(f"interrupted during stage {stage!r}; partial results and the report: {failed}", file=sys.stderr)
            raise
        message = str(error) if isinstance(error, RecipeError) else f"{type(error).__name__}: {error}"
        raise StageFailed(f"stage {stage!r} failed: {message}\npartial results and the report: {failed}") from error
    run.report["status"] = "succeeded"
    run.checkpoint()
    run.seal()
    if final.exists():
        reason = _refuse_to_replace(final) if overwrite else "it exists and overwrite was not asked for"
        if reason is not None:  # it appeared, or changed, while this run was working
            failed = fresh_path(final.with_name(final.name + ".failed"))
            os.rename(run.path, failed)
            raise RecipeError(f"{final} changed while this run was working ({reason}); its results are in {failed}")
        old = _owned_temporary_dir(final.parent, f".{final.name}.replaced-")
        os.rename(final, old / final.name)
        os.rename(run.path, final)
        shutil.rmtree(old)
    else:
        os.rename(run.path, final)
