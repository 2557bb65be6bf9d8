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

# The Mosaic GPU interpreter (jax >= 0.11; tests/test_mosaic.py) can deadlock with fewer than 5
# XLA:CPU threads (chunkattn/pallas/mosaic_compat.py says why; issue 21). jaxlib sizes its CPU
# thread pools once, when the CPU client starts, from PJRT_NPROC (else the CPU count: 2 here):
# set here, before any test starts it. A PJRT_NPROC or NPROC the caller set is kept (the
# interpreter tests skip if it is too small). jax 0.10 (CI's main job) runs no interpreter.
if tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11):
    from chunkattn.pallas import mosaic_compat  # noqa: E402

    if not {"PJRT_NPROC", "NPROC"} & set(os.environ):
        threads = max(mosaic_compat.xla_cpu_threads(), mosaic_compat.INTERPRETER_CPU_THREADS)
        os.environ["PJRT_NPROC"] = str(threads)

# One persistent compilation cache for the session's processes (pytest-xdist workers and the
# subprocess checks): the same program compiled by several tests, such as the dense reference
# that every implementation's suite compares against, is compiled once. Keys include the
# program and the jax version, so a stale entry is never used. CHUNKATTN_TEST_CACHE=0 disables.
if os.environ.get("CHUNKATTN_TEST_CACHE", "1") != "0":
    _cache = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"
    jax.config.update("jax_compilation_cache_dir", str(_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
