"""Ring attention on 8 host CPU devices: results as one JSON line (tests/test_parallel.py).

    .venv/bin/python tests/parallel_check.py

It sets up its 8 host devices itself (XLA_FLAGS, JAX_PLATFORMS=cpu) unless they are set.
"""

from __future__ import annotations

import json
import os
import sys

import host_devices  # noqa: F401  (8 host CPU devices, set up before jax is imported)
import jax
import jax.numpy as jnp
import numpy as np

import chunkattn
import chunkattn.pallas
from chunkattn import parallel, testing
from chunkattn.parallel import ring_attention


def main() -> int:
    assert len(jax.devices()) == 8, jax.devices()
    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((8,), ("sp",), axis_types=auto)
    results = {}
    cfg = chunkattn.ChunkConfig(4, 4)
    seg = jnp.sort(jax.random.randint(jax.random.PRNGKey(7), (2, 64), 0, 3), axis=1)
    seg = seg.astype(jnp.uint32) + jnp.uint32(2**31 - 1)  # ids past int32: compared exactly
    tab = jnp.array([0.05, 0.1, 0.2, 0.4])  # a score_fn's learnable slopes (per head)
    cases = {
        "full": (dict(num_heads=4, num_kv_heads=4), dict()),
        "causal_gqa": (dict(num_heads=4, num_kv_heads=2, head_dim_v=8), dict(is_causal=True)),
        "causal_segments": (
            dict(num_heads=2, num_kv_heads=1),
            dict(is_causal=True, segment_ids=seg),
        ),
        "causal_window_offset_sinks": (
            dict(num_heads=4, num_kv_heads=2),
            dict(
                is_causal=True,
                local_window_size=(9, 0),
                q_offset=jnp.array([3, 0]),
                sinks=jnp.array([0.5, -1.0, 2.0, 0.0]),
            ),
        ),
        "window_lengths_soft_cap_mask_fn": (
            dict(num_heads=4, num_kv_heads=2),
            dict(
                local_window_size=(5, 2),
                query_seq_lengths=jnp.array([64, 30]),
                key_value_seq_lengths=jnp.array([50, 64]),
                logits_soft_cap=2.0,
                mask_fn=lambda b, h, i, j: (i + j) % 3 != 0,
            ),
        ),
        "dropout_score_fn_params": (
            dict(num_heads=4, num_kv_heads=2),
            dict(
                is_causal=True,
                dropout_rate=0.3,
                dropout_rng=jax.random.PRNGKey(2),
                broadcast_dropout=False,
                tab=tab,
            ),
        ),
    }
    for name, (shape, kw) in cases.items():
        q, k, v = testing.random_qkv(jax.random.PRNGKey(len(name)), seq_q=64, head_dim=16, **shape)
        proj = jax.random.normal(jax.random.PRNGKey(1), q.shape[:3] + (v.shape[-1],))
        kw = dict(kw)
        params = {"sinks": kw.pop("sinks", None), "tab": kw.pop("tab", None)}

        def loss(f, q, k, v, params, kw=kw, proj=proj):
            extra = {}
            if params["sinks"] is not None:
                extra["sinks"] = params["sinks"]
            if params["tab"] is not None:  # a score_fn closing over a differentiated array
                t = params["tab"]
                extra["score_fn"] = lambda s, b, h, i, j: s - t[h] * jnp.abs(i - j)
            return jnp.sum(f(q, k, v, **kw, **extra) * proj)

        ring = lambda q, k, v, **kw: ring_attention(
            q, k, v, mesh=mesh, axis_name="sp", config=cfg, **kw
        )
        grad = lambda f: jax.value_and_grad(lambda *a: loss(f, *a), argnums=(0, 1, 2, 3))
        got = jax.jit(grad(ring))(q, k, v, params)
        want = grad(chunkattn.reference_attention)(q, k, v, params)
        leaves = lambda g: jax.tree_util.tree_leaves(g[1])
        results[name] = {
            "out": abs(float(got[0]) - float(want[0])) / max(1.0, abs(float(want[0]))),
            "grads": max(
                testing.relative_error(g, w) for g, w in zip(leaves(got), leaves(want), strict=True)
            ),
        }
    # Each ring step in the Pallas kernels (in the interpreter): causal zig-zag pieces of two
    # 16-blocks, GQA, segment ids, query lengths (with sinks: a padding row's merged lse is
    # its sink's), soft cap and q_offset, against single-device dot_product_attention.
    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(5), seq_q=512, num_heads=4, num_kv_heads=2, head_dim=16, head_dim_v=8
    )
    proj = jax.random.normal(jax.random.PRNGKey(1), q.shape[:3] + (v.shape[-1],))
    kwp = dict(is_causal=True, q_offset=jnp.array([0, 2]), logits_soft_cap=2.0)
    kwp |= dict(query_seq_lengths=jnp.array([512, 300]))
    kwp |= dict(segment_ids=jnp.sort(jax.random.randint(jax.random.PRNGKey(7), (2, 512), 0, 9)))
    blocks = chunkattn.pallas.PallasConfig(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)

    def lossp(f, q, k, v, s):
        return jnp.sum(f(q, k, v, sinks=s, **kwp) * proj)

    ringp = lambda q, k, v, **kw: ring_attention(
        q, k, v, mesh=mesh, axis_name="sp", implementation="pallas", config=blocks, **kw
    )
    gradp = lambda f: jax.value_and_grad(lambda *a: lossp(f, *a), argnums=(0, 1, 2, 3))
    sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
    os.environ["CHUNKATTN_PALLAS_INTERPRET"] = "1"  # read when the ring is built: this case only
    got = jax.jit(gradp(ringp))(q, k, v, sinks)
    os.environ.pop("CHUNKATTN_PALLAS_INTERPRET")
    want = gradp(chunkattn.dot_product_attention)(q, k, v, sinks)
    results["pallas_ring"] = {
        "out": abs(float(got[0]) - float(want[0])) / max(1.0, abs(float(want[0]))),
        "grads": max(testing.relative_error(g, w) for g, w in zip(got[1], want[1], strict=True)),
    }
    # Data × sequence × tensor parallelism: batch over dp, sequence over sp, heads over tp.
    mesh3 = jax.make_mesh((2, 2, 2), ("dp", "sp", "tp"), axis_types=auto * 3)
    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(9), seq_q=32, num_heads=4, num_kv_heads=2, head_dim=16
    )
    proj = jax.random.normal(jax.random.PRNGKey(1), q.shape)
    sinks = jnp.array([0.5, 1.0, -1.0, 2.0])
    kw3 = dict(is_causal=True, local_window_size=(6, 0), segment_ids=seg[:, :32])

    def loss3(f, q, k, v, s):
        return jnp.sum(f(q, k, v, sinks=s, **kw3) * proj)

    ring3 = lambda q, k, v, **kw: ring_attention(
        q, k, v, mesh=mesh3, axis_name="sp", batch_axis="dp", head_axis="tp", config=cfg, **kw
    )
    grad3 = lambda f: jax.value_and_grad(lambda *a: loss3(f, *a), argnums=(0, 1, 2, 3))
    got = jax.jit(grad3(ring3))(q, k, v, sinks)
    want = grad3(chunkattn.reference_attention)(q, k, v, sinks)
    results["dp_sp_tp"] = {
        "out": abs(float(got[0]) - float(want[0])) / max(1.0, abs(float(want[0]))),
        "grads": max(testing.relative_error(g, w) for g, w in zip(got[1], want[1], strict=True)),
    }
    # Under jit, a window with a concrete q_offset still skips ring steps (T=64 on 8 devices:
    # blocks of 8 rows, window (4, 0): only the own block and the previous one).
    q, k, v = testing.random_qkv(jax.random.PRNGKey(0), seq_q=64, head_dim=16)
    seen, plain = [], parallel.ring_steps
    parallel.ring_steps = lambda *a: seen.append(plain(*a)) or seen[-1]
    jax.jit(
        lambda q, k, v: ring_attention(q, k, v, mesh=mesh, axis_name="sp", local_window_size=(4, 0))
    ).lower(q, k, v)
    parallel.ring_steps = plain
    results["jit_window_steps"] = seen[-1]
    with jax.debug_infs(True):  # eager: one compiled program, its internal −inf unseen
        out = ring_attention(q, k, v, mesh=mesh, axis_name="sp", is_causal=True)
    results["debug_infs_finite"] = bool(jnp.all(jnp.isfinite(out)))
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
    results["collective_permute"] = "collective-permute" in hlo
    results["all_gather"] = "all-gather" in hlo
    try:
        ring_attention(q[:, :60], k[:, :60], v[:, :60], mesh=mesh, axis_name="sp")
        results["uneven"] = "no error"
    except ValueError as e:
        results["uneven"] = str(e)
    # Per-device compiled memory (args + outputs + temp) of fwd+bwd, T=32768, on 1, 2, 4, 8 devices.
    mem, temp = {}, {}
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
        temp[n] = ma.temp_size_in_bytes
    results["memory"] = mem
    results["temp_memory"] = temp
    print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
