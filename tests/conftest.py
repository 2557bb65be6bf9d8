"""Test-session setup shared by every test file."""

from __future__ import annotations

import os
import pathlib

# The tests compile hundreds of small programs and run each once or twice, so compiling is
# nearly all of their time. XLA:CPU then skips LLVM's optimisation passes: the same programs
# (same HLO, same XLA passes, same results to rounding), compiled in about half the time.
# Benchmarks and users keep the default. Set before jax's first use, which reads XLA_FLAGS
# once; subprocesses inherit it. CHUNKATTN_TEST_OPT=1 keeps LLVM's default optimisation.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if os.environ.get("CHUNKATTN_TEST_OPT", "0") == "0":
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()

import jax  # noqa: E402

# One persistent compilation cache for the session's processes (pytest-xdist workers and the
# subprocess checks): the same program compiled by several tests, such as the dense reference
# that every implementation's suite compares against, is compiled once. Keys include the
# program and the jax version, so a stale entry is never used. CHUNKATTN_TEST_CACHE=0 disables.
if os.environ.get("CHUNKATTN_TEST_CACHE", "1") != "0":
    _cache = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"
    jax.config.update("jax_compilation_cache_dir", str(_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
