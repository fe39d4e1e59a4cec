"""medcode_jax.main's persistent compilation cache choice (--compilation_cache)."""
from __future__ import annotations

import os

import jax
import pytest

from medcode_jax import main


@pytest.fixture
def restore_cache_config():
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_compilation_cache_max_size", saved[1])


def test_default_explicit_and_off(restore_cache_config, tmp_path, monkeypatch):
    # the test session's cache (tests/conftest.py sets JAX_COMPILATION_CACHE_DIR) is kept
    session = jax.config.jax_compilation_cache_dir
    assert session and main._compilation_cache("") == session
    # explicit directory: used, and bounded when JAX's default (unbounded) is in force
    jax.config.update("jax_compilation_cache_max_size", -1)
    assert main._compilation_cache(str(tmp_path / "c")) == str(tmp_path / "c")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
    assert jax.config.jax_compilation_cache_max_size == main.CACHE_MAX_BYTES
    # nothing configured anywhere: ~/.cache/medcode_jax/xla, XDG_CACHE_HOME honoured
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert main._compilation_cache("") == os.path.join(str(tmp_path / "xdg"), "medcode_jax", "xla")
    # an uncreatable directory: off with a warning, not a failure at the first compilation
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main._compilation_cache(str(blocker / "sub")) is None
    assert jax.config.jax_compilation_cache_dir is None
    # off
    assert main._compilation_cache("None") is None
    assert jax.config.jax_compilation_cache_dir is None
