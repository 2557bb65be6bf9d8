"""Ring attention on 8 host CPU devices (in a subprocess, so other tests keep one device)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from chunkattn import testing


def _bare_env() -> dict[str, str]:
    """No device set-up: the scripts, run as a user runs them, make their own 8 host devices."""
    return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


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
    "case", ["full", "causal", "causal_gqa", "causal_segments", "causal_segments_sinks"]
)
def test_forward_and_gradients_equal_the_reference(results, case):
    tol = testing.tolerance("float32")
    assert results[case]["out"] <= tol and results[case]["grads"] <= 2 * tol, results[case]


def test_segment_ids_that_do_not_fit_int32_are_refused(results):
    assert "segment_ids" in results["wide_segments"], results["wide_segments"]


def test_kv_travel_the_ring_and_are_not_all_gathered(results):
    assert results["collective_permute"] and not results["all_gather"]
    assert results["all_to_all"]  # causal: the striped re-deal


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
def test_training_with_data_and_sequence_parallelism_matches_one_device():
    env = _bare_env()
    script = pathlib.Path(__file__).with_name("mesh_train_check.py")
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(losses["mesh"]) == len(losses["single"]) == 4
    for a, b in zip(losses["single"], losses["mesh"], strict=True):
        assert abs(a - b) < 1e-4, losses
