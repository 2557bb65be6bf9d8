"""Test-session setup shared by every test file."""

from __future__ import annotations

import os
import pathlib

import jax

# One persistent compilation cache for the session's processes (pytest-xdist workers and the
# subprocess checks): the same program compiled by several tests, such as the dense reference
# that every implementation's suite compares against, is compiled once. Keys include the
# program and the jax version, so a stale entry is never used. CHUNKATTN_TEST_CACHE=0 disables.
if os.environ.get("CHUNKATTN_TEST_CACHE", "1") != "0":
    _cache = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"
    jax.config.update("jax_compilation_cache_dir", str(_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
