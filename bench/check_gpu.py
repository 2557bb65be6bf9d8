"""Correctness of an implementation on the real device at realistic sizes, one line per case.

python bench/check_gpu.py --impl pallas
"""

from __future__ import annotations

import argparse
import sys
import traceback

import jax
import jax.numpy as jnp

import chunkattn
from chunkattn import testing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="pallas")
    p.add_argument("--only", default="", help="run only cases whose name contains this")
    args = p.parse_args(argv)
    fn = lambda *a, **kw: chunkattn.dot_product_attention(*a, implementation=args.impl, **kw)
    seg = jnp.sort(jax.random.randint(jax.random.PRNGKey(9), (2, 1000), 0, 4), axis=1)
    bias = jax.random.normal(jax.random.PRNGKey(10), (1, 4, 1, 700), jnp.bfloat16)
    full_bias = jax.random.normal(jax.random.PRNGKey(11), (2, 4, 500, 700), jnp.float32)
    dense_mask = jax.random.uniform(jax.random.PRNGKey(12), (2, 1, 500, 700)) < 0.8
    alibi = lambda s, b, h, i, j: s - 2.0 ** (-(h + 1.0)) * jnp.abs(i - j).astype(s.dtype)
    stripes = lambda b, h, i, j: (j % 3 != 1) | (h % 2 == 0) | (i == j)
    cases = [
        ("bf16 causal T=1000 H=128", dict(seq_q=1000, head_dim=128), dict(is_causal=True)),
        (
            "bf16 full T=777 S=1500 GQA 8/2 H=64",
            dict(seq_q=777, seq_k=1500, num_heads=8, num_kv_heads=2, head_dim=64),
            {},
        ),
        (
            "bf16 window (100, 20) H=72",
            dict(seq_q=1000, head_dim=72),
            dict(local_window_size=(100, 20)),
        ),
        (
            "bf16 segments + kv lengths",
            dict(seq_q=1000, head_dim=128),
            dict(segment_ids=seg, key_value_seq_lengths=jnp.array([1000, 300]), is_causal=True),
        ),
        (
            "bf16 soft cap, q_offset, H=256",
            dict(seq_q=300, seq_k=500, head_dim=256),
            dict(logits_soft_cap=20.0, is_causal=True, q_offset=200),
        ),
        ("f16 causal H=96", dict(seq_q=600, head_dim=96, dtype=jnp.float16), dict(is_causal=True)),
        (
            "bf16 bias [1, N, 1, S] + score_fn (ALiBi) + mask_fn",
            dict(seq_q=500, seq_k=700, head_dim=128),
            dict(bias=bias, score_fn=alibi, mask_fn=stripes, is_causal=True, q_offset=200),
        ),
        (
            "bf16 full bias (f32) + dense mask [B, 1, T, S] + soft cap",
            dict(seq_q=500, seq_k=700, head_dim=64),
            dict(bias=full_bias, mask=dense_mask, logits_soft_cap=30.0),
        ),
        (
            "bf16 dropout 0.1 (per head) + [1, N, 1, S] bias, causal",
            dict(seq_q=500, seq_k=700, head_dim=128),
            dict(
                bias=bias,
                dropout_rate=0.1,
                dropout_rng=jax.random.PRNGKey(13),
                broadcast_dropout=False,
                is_causal=True,
            ),
        ),
        (
            "f32 causal H=128",
            dict(seq_q=500, head_dim=128, dtype=jnp.float32),
            dict(is_causal=True),
        ),
    ]
    cases = [c for c in cases if args.only in c[0]]
    failures = 0
    for name, shape, kwargs in cases:
        shape.setdefault("dtype", jnp.bfloat16)
        q, k, v = testing.random_qkv(jax.random.PRNGKey(len(name)), **shape)
        kwargs = dict(kwargs)
        b = kwargs.pop("bias", None)
        try:
            testing.assert_matches_reference(fn, q, k, v, b, **kwargs)
            print(f"ok    {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every case
            failures += 1
            print(f"FAIL  {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc(limit=3)
    print(f"{len(cases) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
