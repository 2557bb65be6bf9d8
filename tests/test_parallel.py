"""Ring attention on 8 host CPU devices (in a subprocess, so other tests keep one device)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAG

import chunkattn
import chunkattn.pallas
from chunkattn import masks, testing
from chunkattn.parallel import RingLayout, ring_attention, ring_layout, ring_steps, ring_work


def _bare_env() -> dict[str, str]:
    """No device set-up: the scripts, run as a user runs them, make their own 8 host devices
    (conftest's compile-speed flag stays: it changes how fast XLA compiles, not what)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    if FAST_COMPILE_FLAG in os.environ.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = FAST_COMPILE_FLAG
    return env


@pytest.fixture(scope="module")
def results():
    env = _bare_env()
    script = pathlib.Path(__file__).with_name("parallel_check.py")
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "case",
    [
        "full",
        "causal_gqa",
        "causal_segments",
        "causal_window_offset_sinks",
        "window_lengths_soft_cap_mask_fn",
        "dropout_score_fn_params",
        "pallas_ring",
        "dp_sp_tp",
    ],
)
def test_forward_and_gradients_equal_the_reference(results, case):
    """Every position-based option at global positions equals one device: the value of a
    projected loss and its gradients (q, k, v, sinks, a score_fn's closed-over slopes)."""
    tol = testing.tolerance("float32")
    assert results[case]["out"] <= tol and results[case]["grads"] <= 2 * tol, results[case]


def test_segment_ids_that_do_not_fit_int32_are_refused(results):
    assert "segment_ids" in results["wide_segments"], results["wide_segments"]


def test_kv_travel_the_ring_and_are_not_all_gathered(results):
    assert results["collective_permute"] and not results["all_gather"]


def test_a_window_skips_ring_steps_under_jit(results):
    assert results["jit_window_steps"] == [0, 1], results["jit_window_steps"]


def test_eager_ring_is_clean_under_debug_infs(results):
    assert results["debug_infs_finite"]


def test_uneven_sequence_is_rejected(results):
    assert (
        "divide evenly over 8 devices" in results["uneven"]
        and "(2, 60, 4, 16)" in results["uneven"]
    )


def test_memory_per_device_falls_with_devices(results):
    mem = {int(k): v for k, v in results["memory"].items()}
    assert mem[4] < 0.6 * mem[2] and mem[8] < 0.6 * mem[4], mem
    assert mem[8] < mem[1] / 3, mem


@pytest.mark.slow
def test_training_with_data_sequence_and_tensor_parallelism_matches_one_device():
    """chunkattn-train on --mesh dp=2,sp=2,tp=2 (8 host devices) gives one device's losses
    (mesh_train_check.py --all adds dp=2,sp=4); with tp the projections are column-/row-
    parallel and the heads stay sharded through the attention (the compiled step gathers
    nothing)."""
    env = _bare_env()
    script = pathlib.Path(__file__).with_name("mesh_train_check.py")
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    losses = results["losses"]
    assert set(losses) == {"single", "dp=2,sp=2,tp=2"}, losses
    for mesh in ("dp=2,sp=2,tp=2",):
        assert len(losses[mesh]) == len(losses["single"]) == 4
        for a, b in zip(losses["single"], losses[mesh], strict=True):
            assert abs(a - b) < 1e-4, (mesh, losses)
    column, row = [None, "tp"], ["tp", None]
    specs = {"attn.wq": column, "attn.wk": column, "attn.wv": column, "attn.wo": row}
    specs |= {"attn.sinks": ["tp"], "fc": column, "proj": row}
    assert results["tp"]["specs"] == specs, results["tp"]
    collectives = results["tp"]["collectives"]
    assert collectives.get("collective-permute", 0) > 0, collectives  # the ring over sp
    assert collectives.get("all-reduce", 0) > 0, collectives  # row-parallel sums, dp gradients
    assert "all-gather" not in collectives and "all-to-all" not in collectives, collectives


def test_causal_zigzag_layout_balances_the_work():
    """Each device computes the same number of chunk pairs under a causal mask (the zig-zag
    layout), within 10% of the mean as the issue asks; contiguous blocks would not."""
    causal = masks.MaskSpec(is_causal=True)
    work = ring_work(ring_layout(8, 2048, 2048, True), causal, 0, 32, 32)
    assert np.all(np.abs(work - work.mean()) <= 0.1 * work.mean()), work
    contiguous = ring_work(RingLayout(8, False, 256, 256), causal, 0, 32, 32)
    assert contiguous.max() > 4 * contiguous.min(), contiguous  # what zig-zag avoids


def test_window_skips_whole_ring_steps():
    flat = ring_layout(8, 4096, 4096, False)
    assert ring_steps(flat, masks.MaskSpec(window=(300, 0)), (0, 0)) == [0, 1]
    assert ring_steps(flat, masks.MaskSpec(window=(300, 600)), (0, 0)) == [0, 1, 6, 7]
    assert ring_steps(flat, masks.MaskSpec(), (0, 0)) == list(range(8))
    assert ring_steps(flat, masks.MaskSpec(window=(300, 0)), None) == list(range(8))  # traced
    zigzag = ring_layout(8, 4096, 4096, True)
    assert ring_steps(zigzag, masks.MaskSpec(is_causal=True, window=(300, 0)), (0, 0)) == [
        0,
        1,
        2,
        6,
        7,
    ]


def test_what_the_ring_does_not_serve_is_named(monkeypatch):
    mesh = jax.make_mesh((1,), ("sp",))
    q = k = v = jnp.ones((1, 8, 2, 16))
    for kwargs, feature in [
        (dict(bias=jnp.zeros((1, 2, 8, 8))), "dense bias"),
        (dict(mask=jnp.ones((8, 8), bool)), "dense mask"),
        (dict(implementation="pallas"), "implementation='pallas'.*GPU backend"),
        (dict(config=chunkattn.pallas.PallasConfig()), "takes a ChunkConfig"),
        (dict(implementation="splash"), "implementation='splash' per step"),
    ]:
        with pytest.raises(NotImplementedError, match=feature):
            ring_attention(q, k, v, mesh=mesh, axis_name="sp", **kwargs)
    # The kernels' positions are the block's own: what hashes or passes global positions is
    # the chunked contract's (implementation=None on a GPU falls back to it for these).
    monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")
    for kwargs, feature in [
        (dict(mask_fn=lambda b, h, i, j: i >= j), "mask_fn"),
        (dict(score_fn=lambda s, b, h, i, j: s), "score_fn"),
        (dict(dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0)), "dropout"),
        (dict(config=chunkattn.ChunkConfig()), "PallasConfig, got ChunkConfig"),
    ]:
        with pytest.raises(NotImplementedError, match=feature):
            ring_attention(q, k, v, mesh=mesh, axis_name="sp", implementation="pallas", **kwargs)
    with pytest.raises(ValueError, match="sinks"):
        ring_attention(q, k, v, mesh=mesh, axis_name="sp", sinks=jnp.zeros(3))
    with pytest.raises(ValueError, match="implementation"):
        ring_attention(q, k, v, mesh=mesh, axis_name="sp", implementation="bogus")


def test_two_processes_match_one_device(tmp_path):
    """2 processes × 4 host CPU devices joined by `jax.distributed.initialize` (gloo CPU
    collectives): causal GQA ring attention with a window and sinks (forward and gradients) and
    two GPT training steps on dp=2, sp=4 equal one device (tests/multiprocess_check.py)."""
    script = pathlib.Path(__file__).with_name("multiprocess_check.py")
    with socket.socket() as s:  # a free port for process 0's coordination service
        s.bind(("localhost", 0))
        coordinator = f"localhost:{s.getsockname()[1]}"
    procs, logs = [], []
    for i in range(2):
        out, err = tmp_path / f"out{i}.txt", tmp_path / f"err{i}.txt"
        logs.append((out, err))
        cmd = [sys.executable, str(script), "--process-id", str(i), "--coordinator", coordinator]
        with open(out, "w") as fo, open(err, "w") as fe:
            procs.append(subprocess.Popen(cmd, stdout=fo, stderr=fe, env=_bare_env()))
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in procs):  # one failed process leaves the other waiting
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    codes = [p.wait() for p in procs]
    stderr = [err.read_text()[-3000:] for _, err in logs]
    assert codes == [0, 0], (codes, stderr)
    stdout = logs[0][0].read_text()  # gloo prints its connection messages here too
    results = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    assert results["process_count"] == 2 and results["device_count"] == 8, results
    assert results["local_device_count"] == 4 and results["processes_of_devices"] == [0, 1]
    errors = results["attention"]
    tol = testing.tolerance("float32")
    assert errors["value"] <= tol and errors["out"] <= tol, errors
    for name in ("dq", "dk", "dv", "dsinks"):
        assert errors[name] <= testing.tolerance("float32", grad=True), errors
    training = results["training"]
    assert training["dp_row_processes"] == [[0], [1]], training  # dp spans the processes
    assert len(training["mesh"]) == len(training["single"]) == 2, training
    for a, b in zip(training["single"], training["mesh"], strict=True):
        assert abs(a - b) < 1e-4, training
