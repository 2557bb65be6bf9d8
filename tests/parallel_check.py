"""Ring attention on 8 host CPU devices: results as one JSON line (tests/test_parallel.py).

    .venv/bin/python tests/parallel_check.py

It sets up its 8 host devices itself (XLA_FLAGS, JAX_PLATFORMS=cpu) unless they are set.
"""

from __future__ import annotations

import json
import sys

import host_devices  # noqa: F401  (8 host CPU devices, set up before jax is imported)
import jax
import jax.numpy as jnp
import numpy as np

import chunkattn
from chunkattn import testing
from chunkattn.parallel import ring_attention


def main() -> int:
    assert len(jax.devices()) == 8, jax.devices()
    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((8,), ("sp",), axis_types=auto)
    results = {}
    cfg = chunkattn.ChunkConfig(4, 4)
    seg = jnp.sort(jax.random.randint(jax.random.PRNGKey(7), (2, 64), 0, 3), axis=1)
    seg = seg.astype(jnp.uint32) + jnp.uint32(2**31 - 1)  # ids past int32: compared exactly
    cases = {
        "full": (dict(num_heads=4, num_kv_heads=4), dict()),
        "causal": (dict(num_heads=4, num_kv_heads=4), dict(is_causal=True)),
        "causal_gqa": (dict(num_heads=4, num_kv_heads=2), dict(is_causal=True)),
        "causal_segments": (
            dict(num_heads=2, num_kv_heads=1),
            dict(is_causal=True, segment_ids=seg),
        ),
    }
    for name, (shape, kw) in cases.items():
        q, k, v = testing.random_qkv(jax.random.PRNGKey(len(name)), seq_q=64, head_dim=16, **shape)
        proj = jax.random.normal(jax.random.PRNGKey(1), q.shape[:3] + (v.shape[-1],))

        def loss(f, q, k, v, kw=kw, proj=proj):
            return jnp.sum(f(q, k, v, **kw) * proj)

        ring = lambda q, k, v, **kw: ring_attention(
            q, k, v, mesh=mesh, axis_name="sp", config=cfg, **kw
        )
        got = jax.jit(jax.value_and_grad(lambda *a, r=ring: loss(r, *a), argnums=(0, 1, 2)))(
            q, k, v
        )
        want = jax.value_and_grad(
            lambda *a: loss(chunkattn.reference_attention, *a), argnums=(0, 1, 2)
        )(q, k, v)
        out_err = testing.relative_error(
            ring(q, k, v, **kw), chunkattn.reference_attention(q, k, v, **kw)
        )
        grad_err = max(testing.relative_error(g, w) for g, w in zip(got[1], want[1], strict=True))
        results[name] = {"out": out_err, "grads": grad_err}
    # Sinks: forward, and gradients for q, k, v and the (replicated) sinks themselves.
    q, k, v = testing.random_qkv(jax.random.PRNGKey(5), seq_q=64, num_heads=4, num_kv_heads=2)
    sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
    proj = jax.random.normal(jax.random.PRNGKey(1), q.shape)
    kw = dict(is_causal=True, segment_ids=seg)

    def sink_loss(f, q, k, v, s):
        return jnp.sum(f(q, k, v, sinks=s, **kw) * proj)

    ring = lambda q, k, v, **kw: ring_attention(
        q, k, v, mesh=mesh, axis_name="sp", config=cfg, **kw
    )
    got = jax.jit(jax.grad(lambda *a: sink_loss(ring, *a), argnums=(0, 1, 2, 3)))(q, k, v, sinks)
    want = jax.grad(lambda *a: sink_loss(chunkattn.reference_attention, *a), argnums=(0, 1, 2, 3))(
        q, k, v, sinks
    )
    results["causal_segments_sinks"] = {
        "out": testing.relative_error(
            ring(q, k, v, sinks=sinks, **kw),
            chunkattn.reference_attention(q, k, v, sinks=sinks, **kw),
        ),
        "grads": max(testing.relative_error(g, w) for g, w in zip(got, want, strict=True)),
    }
    q, k, v = testing.random_qkv(jax.random.PRNGKey(0), seq_q=64, head_dim=16)
    try:  # 64-bit ids that do not fit int32 (no x64): refused, never truncated
        wide = np.tile(np.repeat(np.array([2**40, 0], np.int64), 32), (2, 1))
        ring_attention(q, k, v, mesh=mesh, axis_name="sp", segment_ids=wide)
        results["wide_segments"] = "accepted"
    except ValueError as e:
        results["wide_segments"] = str(e)
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sp"))
    q, k, v = (jax.device_put(x, sharded) for x in (q, k, v))
    f = jax.jit(
        jax.grad(
            lambda q, k, v: ring_attention(
                q, k, v, mesh=mesh, axis_name="sp", is_causal=True
            ).sum(),
            argnums=(0, 1, 2),
        )
    )
    hlo = f.lower(q, k, v).compile().as_text()
    results["all_to_all"] = "all-to-all" in hlo
    results["collective_permute"] = "collective-permute" in hlo
    results["all_gather"] = "all-gather" in hlo
    try:
        ring_attention(q[:, :60], k[:, :60], v[:, :60], mesh=mesh, axis_name="sp")
        results["uneven"] = "no error"
    except ValueError as e:
        results["uneven"] = str(e)
    # Per-device compiled memory (args + outputs + temp) of fwd+bwd, T=32768, on 1, 2, 4, 8 devices.
    mem = {}
    for n in (1, 2, 4, 8):
        m = jax.make_mesh((n,), ("sp",), devices=jax.devices()[:n], axis_types=auto)
        x = jax.ShapeDtypeStruct(
            (1, 32768, 4, 64),
            jnp.float32,
            sharding=jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec(None, "sp")),
        )
        g = jax.jit(
            jax.grad(
                lambda q, k, v, m=m: ring_attention(
                    q, k, v, mesh=m, axis_name="sp", is_causal=True
                ).sum(),
                argnums=(0, 1, 2),
            )
        )
        ma = g.lower(x, x, x).compile().memory_analysis()
        mem[n] = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
    results["memory"] = mem
    print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
