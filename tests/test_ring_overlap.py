"""Ring attention compiled for 8 H100s on this host, without a GPU: K/V travel while blocks compute.

jax's CUDA plugin gives a compile-only topology of 8 H100s (`get_topology_desc(platform="cuda",
topology="1x1x8")`), so XLA's GPU pipeline, its latency-hiding scheduler included, runs here.
In the scheduled HLO of the ring's loop body, the collective-permute that sends this step's K/V
to the next device must start before the step's block computation and finish after it: the
transfer overlaps the compute. (XLA:CPU has only a synchronous collective-permute, so the host
mesh tests cannot show this.) Forward and backward, with the chunked core and with the Pallas
kernels per ring step.

Marked `cuda_aot` and left out of the default run (pyproject.toml); it needs the cuda-aot extra:

    .venv/bin/pip install -e ".[cuda-aot]"
    .venv/bin/python -m pytest -m cuda_aot tests/test_ring_overlap.py

Run on 2026-12-01 with jax 0.10.2: the four cases pass in 9 s. Compute instructions scheduled
under each K/V send of the loop body (causal, T=32768, N=4, H=128, bf16): chunked forward 22,
backward 22 and 3; pallas forward 17, backward 17 and 7.
"""

from __future__ import annotations

import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_compile_report import NEEDS_EXTRA

from chunkattn.parallel import ring_attention

pytestmark = [pytest.mark.cuda_aot, NEEDS_EXTRA]

COMPUTE = re.compile(r"= .*\b(fusion|custom-call|while|dot)\(")


def _eight_h100s():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
    import compile_report  # bench/compile_report.py: the H100 target config
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(
        platform="cuda", topology="1x1x8", target_config=compile_report.H100
    )
    return topo.devices[:8]


def overlapped_sends(hlo: str) -> list[int]:
    """For each collective-permute-start/done pair of the ring's K/V (issued inside a loop
    body), the number of compute instructions scheduled between the two."""
    lines = hlo.splitlines()
    starts, between = {}, []
    for i, line in enumerate(lines):
        start = re.match(r"\s*(?:ROOT )?(%[\w.\-]+) = .* collective-permute-start\(", line)
        if start and "/while/body/" in line:
            starts[start.group(1)] = i
        done = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = .* collective-permute-done\((%[\w.\-]+)\)", line)
        if done and done.group(1) in starts:
            first = starts.pop(done.group(1))
            between.append(sum(bool(COMPUTE.search(x)) for x in lines[first + 1 : i]))
    return between


@pytest.mark.parametrize("implementation", ["chunked", "pallas"])
@pytest.mark.parametrize("backward", [False, True])
def test_kv_sends_overlap_the_block_compute(implementation, backward, monkeypatch):
    monkeypatch.delenv("CHUNKATTN_PALLAS_INTERPRET", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the kernels' GPU check
    mesh = jax.sharding.Mesh(np.array(_eight_h100s()), ("sp",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sp"))
    x = jax.ShapeDtypeStruct((1, 32768, 4, 128), jnp.bfloat16, sharding=spec)

    def attention(q, k, v):
        return ring_attention(
            q, k, v, mesh=mesh, axis_name="sp", is_causal=True, implementation=implementation
        )

    fn = attention
    if backward:
        loss = lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32))
        fn = jax.grad(loss, argnums=(0, 1, 2))
    with jax.default_device(mesh.devices.flat[0]):
        hlo = jax.jit(fn).lower(x, x, x).compile().as_text()
    kernels = 'custom_call_target="__gpu$xla.gpu.triton"' in hlo  # the Pallas kernels
    assert kernels == (implementation == "pallas"), "each ring step runs the path asked for"
    between = overlapped_sends(hlo)
    assert between, "no asynchronous K/V send in the ring's loop"
    assert all(n > 0 for n in between), f"a send with no compute under it: {between}"
