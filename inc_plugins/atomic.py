"""Writes that either complete or leave nothing behind."""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(text)
    # temporary files are created owner-only; the result should have the permissions of any new file
    os.chmod(tmp.name, 0o666 & ~_umask())
    os.replace(tmp.name, path)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def staged_directory(final: Path):
    """Yields a temporary sibling directory that becomes `final` only if the block succeeds.

    Refuses to replace an existing `final` unless it is an empty directory (the rename replaces that): earlier
    results are never overwritten. The check is repeated at the rename, which also refuses a non-empty directory.
    """
    final = Path(final)
    if final.exists() or final.is_symlink():
        if not final.is_dir() or final.is_symlink() or any(final.iterdir()):
            raise FileExistsError(f"{final} already exists and is not an empty directory; refusing to overwrite it: "
                                  f"choose a new directory or remove it")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it owner-only
        os.rename(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
