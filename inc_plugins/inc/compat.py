"""Checks that the installed Intel Neural Compressor still has the 2.x pruning API this project plugs into."""

from importlib import metadata

SUPPORTED_INC_SERIES = "3.7"
INSTALL_HINT = "pip install 'neural-compressor==3.7.1'"


class IncompatibleINCError(ImportError):
    """The installed neural-compressor cannot host these plugins."""


def check_inc_version(version: str | None) -> None:
    """Raise IncompatibleINCError unless `version` is a 3.7.x release.

    3.8 deleted `neural_compressor.compression.pruner`, and releases before 3.7 lack pieces we rely on.
    """
    if version is None:
        raise IncompatibleINCError(f"neural-compressor is not installed; these plugins need {SUPPORTED_INC_SERIES}.x: {INSTALL_HINT}")
    series = ".".join(version.split(".")[:2])
    if series != SUPPORTED_INC_SERIES:
        raise IncompatibleINCError(
            f"neural-compressor {version} is installed, but these plugins need {SUPPORTED_INC_SERIES}.x "
            f"(3.8 removed the pruning API they register into): {INSTALL_HINT}"
        )


def installed_inc_version() -> str | None:
    try:
        return metadata.version("neural-compressor")
    except metadata.PackageNotFoundError:
        return None


def require_supported_inc() -> None:
    check_inc_version(installed_inc_version())
