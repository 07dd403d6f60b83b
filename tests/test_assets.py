"""Offline assets: pinned archives, sha256 verification, atomic unpacking, clear errors."""

import dataclasses
import hashlib
import io
import tarfile

import pytest

from inc_plugins import assets
from inc_plugins.assets import ASSETS, Asset, AssetError, asset_path, fetch, glob_digest


def make_tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    assets._verified.cache_clear()
    return tmp_path / "cache"


@pytest.fixture
def synthetic_asset(tmp_path, monkeypatch):
    """A synthetic npm-style archive served by a stubbed download, registered as asset 'synthetic'."""
    files = {"package/data/a.txt": b"alpha\n", "package/data/b.txt": b"beta\n", "package/README.md": b"x"}
    archive_bytes = make_tar(files)
    archive = tmp_path / "synthetic-1.0.tgz"
    archive.write_bytes(archive_bytes)
    expected_dir = tmp_path / "expected"
    (expected_dir / "texts").mkdir(parents=True)
    for name in ("a.txt", "b.txt"):
        (expected_dir / "texts" / name).write_bytes(files[f"package/data/{name}"])
    asset = Asset(
        name="synthetic", description="synthetic test asset", registry="npm", package="synthetic", version="1.0",
        archive_sha256=hashlib.sha256(archive_bytes).hexdigest(),
        members=(("package/data/*.txt", "texts/"), ("package/README.md", "readme.md")),
        checksums=(("texts/*.txt", glob_digest(expected_dir, "texts/*.txt")),
                   ("readme.md", hashlib.sha256(b"x").hexdigest())),
    )
    monkeypatch.setitem(ASSETS, "synthetic", asset)

    def fake_download(asset_, into):
        target = into / archive.name
        target.write_bytes(archive.read_bytes())
        return target

    monkeypatch.setattr(assets, "_download", fake_download)
    return asset, archive


def test_every_asset_is_pinned_by_version_and_sha256():
    for asset in ASSETS.values():
        assert asset.version and len(asset.archive_sha256) == 64
        assert asset.checksums and all(len(sha) == 64 for _, sha in asset.checksums)


def test_missing_asset_names_the_fetch_command(cache):
    with pytest.raises(AssetError, match=r"not in .*python.* -m inc_plugins\.assets fetch moby-dick"):
        asset_path("moby-dick")


def test_unknown_asset_lists_the_known_ones(cache):
    with pytest.raises(AssetError, match="known assets: .*minilm-l6"):
        asset_path("bert-large")


def test_fetch_unpacks_verifies_and_reuses(cache, synthetic_asset):
    directory = fetch("synthetic")
    assert (directory / "texts" / "a.txt").read_bytes() == b"alpha\n"
    assert (directory / "readme.md").read_bytes() == b"x"
    assert not list(cache.glob(".synthetic-*")), "staging directories are cleaned up"
    stamp = (directory / "texts" / "a.txt").stat().st_mtime_ns
    assert fetch("synthetic") == directory
    assert (directory / "texts" / "a.txt").stat().st_mtime_ns == stamp, "a verified copy is reused"


def test_corrupted_file_is_detected(cache, synthetic_asset):
    directory = fetch("synthetic")
    (directory / "texts" / "b.txt").write_bytes(b"bets\n")  # same size, one byte changed
    with pytest.raises(AssetError, match=r"texts/\*\.txt has sha256 .* expected .*Re-fetch it"):
        asset_path("synthetic")
    assert fetch("synthetic") == directory  # fetching again repairs it
    assert (directory / "texts" / "b.txt").read_bytes() == b"beta\n"


def test_deleted_file_is_detected(cache, synthetic_asset):
    directory = fetch("synthetic")
    (directory / "readme.md").unlink()
    with pytest.raises(AssetError, match="readme.md is missing"):
        asset_path("synthetic")


def test_tampered_archive_is_refused_and_nothing_is_installed(cache, synthetic_asset, monkeypatch):
    asset, _ = synthetic_asset
    monkeypatch.setitem(ASSETS, "synthetic", dataclasses.replace(asset, archive_sha256="0" * 64))
    with pytest.raises(AssetError, match="refusing to use it"):
        fetch("synthetic")
    assert not (cache / "synthetic").exists()


def test_real_assets_verify_when_present():
    """The set-up command fetches every asset before the tests run; each must verify against its pin."""
    for name in ASSETS:
        assert asset_path(name).is_dir()
