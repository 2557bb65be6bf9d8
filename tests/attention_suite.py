"""The shared correctness suite: every implementation against `reference_attention`.

Subclass `AttentionSuite` per implementation (set `implementation`, `config`, maybe `tol_scale`);
pytest collects the subclasses named Test*. Each test checks forward, lse and gradients (query,
key, value, bias) against the dense float32 oracle with the tolerance table in
`chunkattn.testing`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chunkattn
from chunkattn import testing

B, N, K, H = 2, 4, 2, 16


def _key(i: int) -> jax.Array:
    return jax.random.PRNGKey(i)


def _alibi(score, b, h, q_pos, k_pos):
    slope = 2.0 ** (-(h.astype(jnp.float32) + 1.0))
    return score - slope * jnp.abs(q_pos - k_pos).astype(jnp.float32)


def _stripes(b, h, q_pos, k_pos):
    # Keeps the diagonal so most rows see something; drops every third key for odd heads.
    return (k_pos % 3 != 1) | (h % 2 == 0) | (q_pos == k_pos)


def mask_cases(T: int, S: int) -> dict[str, dict[str, Any]]:
    """Every mask kind alone and in combination, as keyword arguments (bias under "bias")."""
    rng = np.random.default_rng(T * 1000 + S)
    seg_q = np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
    seg_k = np.sort(rng.integers(0, 3, (B, S)), axis=1).astype(np.int32)
    dense = rng.random((B, N, T, S)) < 0.7
    return {
        "none": {},
        "causal": {"is_causal": True},
        "window_int": {"local_window_size": 3},
        "window_pair": {"local_window_size": (5, 0)},
        "causal_window": {"is_causal": True, "local_window_size": (4, 2)},
        "causal_offset": {"is_causal": True, "q_offset": max(S - T, 0)},
        "causal_offset_per_batch": {"is_causal": True, "q_offset": jnp.array([0, 7])},
        "query_lengths": {"query_seq_lengths": jnp.array([T, max(T // 2, 1)])},
        "kv_lengths": {"key_value_seq_lengths": jnp.array([S, max(S // 3, 1)])},
        "segment_pair": {"segment_ids": (jnp.asarray(seg_q), jnp.asarray(seg_k))},
        "mask_full": {"mask": jnp.asarray(dense)},
        "mask_ts": {"mask": jnp.asarray(dense[0, 0])},
        "mask_keys": {"mask": jnp.asarray(dense[:, :1, :1, :])},
        "bias_heads_keys": {"bias": jax.random.normal(_key(5), (1, N, 1, S))},
        "bias_full": {"bias": jax.random.normal(_key(6), (B, N, T, S))},
        "bias_ts": {"bias": jax.random.normal(_key(7), (T, S))},
        "mask_fn": {"mask_fn": _stripes},
        "score_fn_alibi": {"score_fn": _alibi},
        "soft_cap": {"logits_soft_cap": 1.5},
        "everything": {
            "is_causal": True,
            "q_offset": max(S - T, 0),
            "local_window_size": (9, 9),
            "key_value_seq_lengths": jnp.array([S, max(S - 5, 1)]),
            "segment_ids": (jnp.asarray(seg_q), jnp.asarray(seg_k)),
            "mask": jnp.asarray(dense[:, :, :, :]),
            "bias": jax.random.normal(_key(8), (1, N, T, 1)),
            "score_fn": _alibi,
            "mask_fn": _stripes,
            "logits_soft_cap": 3.0,
        },
    }


class AttentionSuite:
    """Correctness of one implementation; subclasses set the class attributes."""

    implementation: ClassVar[str] = "chunked"
    config: ClassVar[Any] = chunkattn.ChunkConfig(q_chunk_size=8, kv_chunk_size=16)
    tol_scale: ClassVar[float] = 1.0
    # (T, S) pairs on which the whole mask matrix runs; a subclass may narrow them.
    mask_shapes: ClassVar[tuple[tuple[int, int], ...]] = ((19, 41), (37, 37))
    # An implementation that may decline a request (NotImplementedError naming the feature)
    # sets this: the test is then skipped with that reason instead of failing.
    may_decline: ClassVar[bool] = False

    def attention(self, *args, **kwargs):
        try:
            return chunkattn.dot_product_attention(
                *args, implementation=self.implementation, config=self.config, **kwargs
            )
        except NotImplementedError as e:
            if not self.may_decline:
                raise
            pytest.skip(f"{self.implementation} declines: {e}")

    def check(self, q, k, v, bias=None, **kwargs):
        testing.assert_matches_reference(
            self.attention, q, k, v, bias, tol_scale=self.tol_scale, **kwargs
        )

    @pytest.mark.parametrize("T,S", [(1, 1), (17, 17), (1, 257), (257, 17), (33, 100)])
    def test_lengths(self, T, S):
        q, k, v = testing.random_qkv(
            _key(T + S), seq_q=T, seq_k=S, num_heads=N, num_kv_heads=K, head_dim=H
        )
        self.check(q, k, v)
        self.check(q, k, v, is_causal=True, q_offset=max(S - T, 0))

    @pytest.mark.slow
    def test_long_unequal(self):
        q, k, v = testing.random_qkv(
            _key(3), batch=1, seq_q=1000, seq_k=257, num_heads=2, head_dim=H
        )
        self.check(q, k, v, is_causal=True)

    @pytest.mark.parametrize("name", list(mask_cases(19, 41)))
    @pytest.mark.parametrize("T,S", [(19, 41), (37, 37)])
    def test_mask_kinds(self, name, T, S):
        if (T, S) not in self.mask_shapes:
            pytest.skip(f"{type(self).__name__} runs the mask matrix on {self.mask_shapes}")
        kwargs = dict(mask_cases(T, S)[name])
        bias = kwargs.pop("bias", None)
        q, k, v = testing.random_qkv(
            _key(11), seq_q=T, seq_k=S, num_heads=N, num_kv_heads=K, head_dim=H
        )
        self.check(q, k, v, bias, **kwargs)

    @pytest.mark.parametrize(
        "num_heads,num_kv_heads,head_dim,head_dim_v",
        [(4, 4, 64, 64), (4, 2, 72, 72), (4, 1, 128, 128), (6, 2, 32, 48)],
    )
    def test_heads(self, num_heads, num_kv_heads, head_dim, head_dim_v):
        q, k, v = testing.random_qkv(
            _key(head_dim),
            seq_q=23,
            seq_k=29,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
        )
        self.check(q, k, v, is_causal=True, q_offset=6)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
    @pytest.mark.parametrize("causal", [False, True])
    def test_dtypes(self, dtype, causal):
        q, k, v = testing.random_qkv(
            _key(2), seq_q=45, seq_k=45, num_heads=N, num_kv_heads=K, head_dim=32, dtype=dtype
        )
        self.check(q, k, v, is_causal=causal)
        bias = jax.random.normal(_key(9), (1, N, 1, 45), dtype)
        self.check(q, k, v, bias, is_causal=causal)

    def test_fully_masked_rows(self):
        q, k, v = testing.random_qkv(
            _key(4), seq_q=21, seq_k=30, num_heads=N, num_kv_heads=K, head_dim=H
        )
        kwargs = dict(
            query_seq_lengths=jnp.array([21, 9]), key_value_seq_lengths=jnp.array([30, 0])
        )
        out, lse = self.attention(q, k, v, return_lse=True, **kwargs)
        out, lse = np.asarray(out), np.asarray(lse)
        assert np.all(out[1] == 0) and np.all(np.isneginf(lse[1])), "batch 1 sees no key"
        assert np.all(out[0, 21:] == 0) and np.all(np.isfinite(out))
        grads = jax.grad(
            lambda q, k, v: jnp.sum(self.attention(q, k, v, **kwargs) ** 2), argnums=(0, 1, 2)
        )(q, k, v)
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g))), "NaN/inf gradient"
            assert np.all(np.asarray(g)[1] == 0), "a fully masked batch entry has zero gradient"
        self.check(q, k, v, **kwargs)

    def test_large_logits_f16(self):
        q, k, v = testing.random_qkv(
            _key(12), seq_q=20, seq_k=20, num_heads=2, head_dim=16, dtype=jnp.float16
        )
        q = (q * 25).astype(jnp.float16)  # scores of order ±1e4 after scaling
        k = (k * 25).astype(jnp.float16)
        out, lse = self.attention(q, k, v, return_lse=True, is_causal=True)
        assert np.all(np.isfinite(np.asarray(out, np.float32)))
        assert np.abs(np.asarray(lse)).max() > 1e3, "the test must produce large logits"
        self.check(q, k, v, is_causal=True, grads=False)

    def test_dropout(self):
        q, k, v = testing.random_qkv(
            _key(13), seq_q=33, seq_k=47, num_heads=N, num_kv_heads=K, head_dim=H
        )
        kw = dict(dropout_rate=0.25, is_causal=True, q_offset=14)
        a = self.attention(q, k, v, dropout_rng=_key(1), **kw)
        b = self.attention(q, k, v, dropout_rng=_key(1), **kw)
        c = self.attention(q, k, v, dropout_rng=_key(2), **kw)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert not np.allclose(np.asarray(a), np.asarray(c)), "a new key draws a new mask"
        for broadcast in (True, False):
            self.check(q, k, v, dropout_rng=_key(1), broadcast_dropout=broadcast, **kw)

    def test_3d_inputs(self):
        q, k, v = testing.random_qkv(
            _key(14), batch=None, seq_q=18, seq_k=26, num_heads=N, num_kv_heads=K, head_dim=H
        )
        out, lse = self.attention(q, k, v, return_lse=True, is_causal=True)
        assert out.shape == (18, N, H) and lse.shape == (N, 18)
        ref, ref_lse = chunkattn.reference_attention(q, k, v, return_lse=True, is_causal=True)
        assert testing.relative_error(out, ref) <= testing.tolerance(q.dtype) * self.tol_scale
        assert testing.relative_error(lse, ref_lse) <= testing.tolerance(q.dtype) * self.tol_scale

    def test_vmap(self):
        q, k, v = testing.random_qkv(
            _key(15), seq_q=20, seq_k=20, num_heads=N, num_kv_heads=K, head_dim=H
        )
        stacked = [jnp.stack([x, x[::-1]]) for x in (q, k, v)]  # (2, B, T, N, H)
        fn = lambda q, k, v: self.attention(q, k, v, is_causal=True)
        got = jax.vmap(fn)(*stacked)
        for i in range(2):
            want = fn(*(x[i] for x in stacked))
            assert testing.relative_error(got[i], want) <= 1e-6

    def test_no_retrace(self):
        import chex

        q, k, v = testing.random_qkv(
            _key(16), seq_q=24, seq_k=24, num_heads=N, num_kv_heads=K, head_dim=H
        )

        chex.clear_trace_counter()

        @jax.jit
        @chex.assert_max_traces(n=1)
        def f(q, k, v):
            return self.attention(q, k, v, is_causal=True)

        f(q, k, v).block_until_ready()
        f(q + 1, k, v * 2).block_until_ready()  # new values, same shapes: no retrace

    def test_score_fn_closure_gets_gradients(self):
        """Arrays a score_fn closes over (learned slopes, a position table) are differentiated."""
        q, k, v = testing.random_qkv(
            _key(17), seq_q=21, seq_k=21, num_heads=N, num_kv_heads=K, head_dim=H
        )
        table = jax.random.normal(_key(18), (41,))

        def loss(params, fn):
            slope, table = params
            score_fn = lambda s, b, h, qp, kp: (
                s - slope * jnp.abs(qp - kp) + table[jnp.clip(qp - kp + 20, 0, 40)]
            )
            out = fn(q, k, v, score_fn=score_fn, is_causal=True)
            return jnp.sum(out.astype(jnp.float32) ** 2)

        got = jax.jit(jax.grad(lambda p: loss(p, self.attention)))((jnp.float32(0.3), table))
        want = jax.grad(lambda p: loss(p, chunkattn.reference_attention))((jnp.float32(0.3), table))
        for g, w in zip(got, want, strict=True):
            assert testing.relative_error(g, w) <= testing.tolerance(q.dtype, grad=True)
