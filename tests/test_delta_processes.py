"""delta_rule forward+backward finishes in every one of 8 fresh CPU processes (issue 13).

The chunkwise delta rule used to invert (I + A) with `solve_triangular`, a LAPACK custom call
that on CPU splits a batch of C×C solves over XLA's intra-op thread pool and blocks until the
pieces finish. With two pool threads (a 2-core machine) both could block in such solves at
once, leaving no thread to run the pieces: the process hung forever, in some processes and
not others. Each child here is pinned to two CPUs (so the pool has two threads on any machine),
uses C = 64 with B·N = 2 (the batch size at which the LAPACK kernel splits its work) and runs
the jitted forward+backward from four Python threads at once, which makes the old code hang in
nearly every process; the children run a few at a time, each under a timeout, and the parent
checks every result against the token-by-token recurrence.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np

from chunkattn.variants import delta_rule

PROCESSES = 8  # the old code hung in nearly every process; 20 took 54 s of CI
AT_ONCE = 3  # children running together (the CI machine has 2 cores)
TIMEOUT_S = 90  # per child; a healthy child takes a few seconds
SHAPE = (1, 96, 2, 4, 3)  # B, T, N, H, Hv
CHUNK = 64  # with B·N = 2, the size at which the old LAPACK solve split its batch over the pool

CHILD = textwrap.dedent(
    """
    import os, sys, threading

    index, out = int(sys.argv[1]), sys.argv[2]
    if hasattr(os, "sched_setaffinity"):  # two CPUs: XLA's intra-op pool gets two threads
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[(2 * index) % len(cpus)], cpus[(2 * index + 1) % len(cpus)]})

    import jax, jax.numpy as jnp, numpy as np
    from chunkattn.variants import delta_rule

    sys.path.insert(0, sys.argv[3])
    from test_delta_processes import inputs

    chunk = int(sys.argv[4])
    q, k, v, beta = inputs(index)
    loss = lambda *a: jnp.sum(jnp.sin(delta_rule(*a, chunk_size=chunk)))
    step = jax.jit(lambda *a: (delta_rule(*a, chunk_size=chunk), jax.grad(loss, (0, 1, 2, 3))(*a)))
    results = [None] * 4

    def work(i):
        for _ in range(3):
            results[i] = jax.block_until_ready(step(q, k, v, beta))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    y, grads = results[0]
    for other in results[1:]:
        for a, c in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other)):
            np.testing.assert_array_equal(a, c)
    np.savez(out, *grads, y=y)
    print("done", index)
    """
)


def delta_recurrence(q, k, v, beta):
    """W_t = W_{t−1} + β_t (v_t − W_{t−1} k_t) k_tᵀ, y_t = W_t q_t, one token at a time."""

    def step(w, x):
        qt, kt, vt, bt = x
        err = vt - jnp.einsum("bnvh,bnh->bnv", w, kt)
        w = w + bt[..., None, None] * jnp.einsum("bnv,bnh->bnvh", err, kt)
        return w, jnp.einsum("bnvh,bnh->bnv", w, qt)

    b, t, n, h = q.shape
    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v, beta))
    _, ys = jax.lax.scan(step, jnp.zeros((b, n, v.shape[-1], h)), xs)
    return jnp.swapaxes(ys, 0, 1)


def inputs(index):
    """Process `index`'s q, k (unit rows), v, β in (0, 1): NumPy, so no child compiles for them."""
    b, t, n, h, hv = SHAPE
    rng = np.random.default_rng(index)
    q = rng.standard_normal((b, t, n, h), np.float32)
    k = rng.standard_normal((b, t, n, h), np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((b, t, n, hv), np.float32)
    beta = (1 / (1 + np.exp(-rng.standard_normal((b, t, n))))).astype(np.float32)
    return q, k, v, beta


def test_delta_rule_forward_backward_finishes_in_fresh_processes(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # One compilation shared by the children (the hang was at run time, not in the compiler).
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"))
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    here = str(pathlib.Path(__file__).resolve().parent)
    pending = list(range(PROCESSES))
    running: dict[int, tuple[subprocess.Popen, float]] = {}
    finished = {}
    try:
        while pending or running:
            while pending and len(running) < AT_ONCE:
                i = pending.pop(0)
                out = str(tmp_path / f"{i}.npz")
                cmd = [sys.executable, "-c", CHILD, str(i), out, here, str(CHUNK)]
                proc = subprocess.Popen(
                    cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
                running[i] = (proc, time.monotonic())
            time.sleep(0.1)
            for i, (proc, start) in list(running.items()):
                if proc.poll() is not None:
                    _, err = proc.communicate()
                    assert proc.returncode == 0, f"process {i} failed:\n{err.decode()[-3000:]}"
                    finished[i] = time.monotonic() - start
                    del running[i]
                elif time.monotonic() - start > TIMEOUT_S:
                    raise AssertionError(
                        f"delta_rule forward+backward hung: process {i} still running after "
                        f"{TIMEOUT_S} s ({len(finished)} of {PROCESSES} had finished)"
                    )
    finally:
        for proc, _ in running.values():
            proc.kill()
            proc.wait()
    assert sorted(finished) == list(range(PROCESSES))

    def reference(q, k, v, beta):
        loss = lambda *a: jnp.sum(jnp.sin(delta_recurrence(*a)))
        return delta_recurrence(q, k, v, beta), jax.grad(loss, (0, 1, 2, 3))(q, k, v, beta)

    reference = jax.jit(reference)
    for i in range(PROCESSES):
        want_y, want_grads = reference(*inputs(i))
        got = np.load(tmp_path / f"{i}.npz")
        np.testing.assert_allclose(got["y"], want_y, rtol=1e-4, atol=1e-4)
        for j, want in enumerate(want_grads):
            np.testing.assert_allclose(got[f"arr_{j}"], want, rtol=1e-3, atol=1e-4)


def test_delta_rule_forward_backward_compiles_without_lapack_calls():
    """The deterministic half of the check above: no LAPACK custom call is left to block."""
    loss = lambda *a: jnp.sum(jnp.sin(delta_rule(*a, chunk_size=CHUNK)))
    with jax.default_device(jax.devices("cpu")[0]):
        hlo = jax.jit(jax.grad(loss, (0, 1, 2, 3))).lower(*inputs(0)).compile().as_text()
    targets = re.findall(r'custom_call_target="([^"]*)"', hlo)
    assert not [t for t in targets if "lapack" in t or "trsm" in t], targets
