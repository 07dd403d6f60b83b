"""Shared test fixtures."""

import pytest
import torch

from inc_plugins import assets
from tests.fixtures.tiny_tokenizer import save_tiny_classifier


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and a busy machine makes thread hand-offs very slow)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """(tmp_path, tiny BERT directory) with a private asset cache, so fine-tune caching starts empty, that still
    sees the real movie-snippets asset."""
    real_snippets = assets.asset_path("movie-snippets")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "movie-snippets").symlink_to(real_snippets)
    monkeypatch.setenv(assets.CACHE_ENV, str(cache))
    return tmp_path, save_tiny_classifier(tmp_path / "tiny-bert")
