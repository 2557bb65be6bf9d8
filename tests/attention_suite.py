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
    # The mask kinds the sinks run with (None: every kind); a slow path may narrow them.
    sink_kinds: ClassVar[tuple[str, ...] | None] = None
    # The mask kinds test_mask_kinds runs (None: every kind); a slow path may narrow them.
    mask_kinds: ClassVar[tuple[str, ...] | None] = None
    # The (T, S) pairs test_lengths runs (None: every pair); a slow path may narrow them.
    length_pairs: ClassVar[tuple[tuple[int, int], ...] | None] = None

    def attention(self, *args, **kwargs):
        try:
            return chunkattn.dot_product_attention(
                *args, implementation=self.implementation, config=self.config, **kwargs
            )
        except NotImplementedError as e:
            if not self.may_decline:
                raise
            pytest.skip(f"{self.implementation} declines: {e}")

    def qkv(self, seed: int, **kwargs):
        """A test's query, key and value (`testing.random_qkv`'s keywords). A path that serves
        only some head dims or dtypes maps a test's incidental ones to its own here."""
        return testing.random_qkv(_key(seed), **kwargs)

    def check(self, q, k, v, bias=None, **kwargs):
        testing.assert_matches_reference(
            self.attention, q, k, v, bias, tol_scale=self.tol_scale, **kwargs
        )

    @pytest.mark.parametrize("T,S", [(1, 1), (17, 17), (1, 257), (257, 17), (33, 100)])
    def test_lengths(self, T, S):
        if self.length_pairs is not None and (T, S) not in self.length_pairs:
            pytest.skip(f"{type(self).__name__} runs the lengths {self.length_pairs}")
        q, k, v = self.qkv(T + S, seq_q=T, seq_k=S, num_heads=N, num_kv_heads=K, head_dim=H)
        self.check(q, k, v)
        self.check(q, k, v, is_causal=True, q_offset=max(S - T, 0))

    @pytest.mark.slow
    def test_long_unequal(self):
        q, k, v = self.qkv(3, batch=1, seq_q=1000, seq_k=257, num_heads=2, head_dim=H)
        self.check(q, k, v, is_causal=True)

    @pytest.mark.parametrize("name", list(mask_cases(19, 41)))
    @pytest.mark.parametrize("T,S", [(19, 41), (37, 37)])
    def test_mask_kinds(self, name, T, S):
        if (T, S) not in self.mask_shapes:
            pytest.skip(f"{type(self).__name__} runs the mask matrix on {self.mask_shapes}")
        if self.mask_kinds is not None and name not in self.mask_kinds:
            pytest.skip(f"{type(self).__name__} runs the mask kinds {self.mask_kinds}")
        kwargs = dict(mask_cases(T, S)[name])
        bias = kwargs.pop("bias", None)
        q, k, v = self.qkv(11, seq_q=T, seq_k=S, num_heads=N, num_kv_heads=K, head_dim=H)
        self.check(q, k, v, bias, **kwargs)

    @pytest.mark.parametrize(
        "num_heads,num_kv_heads,head_dim,head_dim_v",
        [(4, 4, 64, 64), (4, 2, 72, 72), (4, 1, 128, 128), (6, 2, 32, 48)],
    )
    def test_heads(self, num_heads, num_kv_heads, head_dim, head_dim_v):
        q, k, v = self.qkv(
            head_dim,
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
        q, k, v = self.qkv(
            2, seq_q=45, seq_k=45, num_heads=N, num_kv_heads=K, head_dim=32, dtype=dtype
        )
        self.check(q, k, v, is_causal=causal)
        bias = jax.random.normal(_key(9), (1, N, 1, 45), dtype)
        self.check(q, k, v, bias, is_causal=causal)

    def test_fully_masked_rows(self):
        q, k, v = self.qkv(4, seq_q=21, seq_k=30, num_heads=N, num_kv_heads=K, head_dim=H)
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

    @pytest.mark.parametrize("name", list(mask_cases(19, 41)))
    def test_sinks_with_every_mask_kind(self, name):
        if self.sink_kinds is not None and name not in self.sink_kinds:
            pytest.skip(f"{type(self).__name__} runs the sinks with {self.sink_kinds}")
        T, S = self.mask_shapes[0]
        kwargs = dict(mask_cases(T, S)[name])
        bias = kwargs.pop("bias", None)
        q, k, v = self.qkv(31, seq_q=T, seq_k=S, num_heads=N, num_kv_heads=K, head_dim=H)
        sinks = jnp.array([0.5, -2.0, 4.0, 0.0])  # one head's sink outweighs its keys
        self.check(q, k, v, bias, sinks=sinks, **kwargs)

    def test_sinks_on_fully_masked_rows(self):
        q, k, v = self.qkv(32, seq_q=21, seq_k=30, num_heads=N, num_kv_heads=K, head_dim=H)
        sinks = jnp.array([1.0, -3.0, 0.0, 2.5])
        kwargs = dict(
            query_seq_lengths=jnp.array([21, 9]),
            key_value_seq_lengths=jnp.array([30, 0]),
            sinks=sinks,
        )
        out, lse = self.attention(q, k, v, return_lse=True, **kwargs)
        out, lse = np.asarray(out), np.asarray(lse)
        # A row that sees no key attends only to its sink: output 0, lse = sink.
        assert np.all(out[1] == 0) and np.all(out[0, 9:] == out[0, 9:]) and np.isfinite(out).all()
        np.testing.assert_allclose(lse[1], np.broadcast_to(np.asarray(sinks)[:, None], (N, 21)))
        grads = jax.grad(
            lambda q, k, v, s: jnp.sum(self.attention(q, k, v, **{**kwargs, "sinks": s}) ** 2),
            argnums=(0, 1, 2, 3),
        )(q, k, v, sinks)
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g))), "NaN/inf gradient"
        assert np.all(np.asarray(grads[0])[1] == 0), "a row attending only to its sink: dq = 0"
        self.check(q, k, v, **kwargs)

    def test_large_logits_f16(self):
        q, k, v = self.qkv(12, seq_q=20, seq_k=20, num_heads=2, head_dim=16, dtype=jnp.float16)
        q = (q * 25).astype(jnp.float16)  # scores of order ±1e4 after scaling
        k = (k * 25).astype(jnp.float16)
        out, lse = self.attention(q, k, v, return_lse=True, is_causal=True)
        assert np.all(np.isfinite(np.asarray(out, np.float32)))
        assert np.abs(np.asarray(lse)).max() > 1e3, "the test must produce large logits"
        self.check(q, k, v, is_causal=True, grads=False)

    def test_dropout(self):
        q, k, v = self.qkv(13, seq_q=33, seq_k=47, num_heads=N, num_kv_heads=K, head_dim=H)
        kw = dict(dropout_rate=0.25, is_causal=True, q_offset=14)
        a = self.attention(q, k, v, dropout_rng=_key(1), **kw)
        b = self.attention(q, k, v, dropout_rng=_key(1), **kw)
        c = self.attention(q, k, v, dropout_rng=_key(2), **kw)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert not np.allclose(np.asarray(a), np.asarray(c)), "a new key draws a new mask"
        for broadcast in (True, False):
            self.check(q, k, v, dropout_rng=_key(1), broadcast_dropout=broadcast, **kw)

    def test_3d_inputs(self):
        q, k, v = self.qkv(
            14, batch=None, seq_q=18, seq_k=26, num_heads=N, num_kv_heads=K, head_dim=H
        )
        out, lse = self.attention(q, k, v, return_lse=True, is_causal=True)
        assert out.shape == (18, N, v.shape[-1]) and lse.shape == (N, 18)
        ref, ref_lse = chunkattn.reference_attention(q, k, v, return_lse=True, is_causal=True)
        assert testing.relative_error(out, ref) <= testing.tolerance(q.dtype) * self.tol_scale
        assert testing.relative_error(lse, ref_lse) <= testing.tolerance(q.dtype) * self.tol_scale

    def test_vmap(self):
        q, k, v = self.qkv(15, seq_q=20, seq_k=20, num_heads=N, num_kv_heads=K, head_dim=H)
        stacked = [jnp.stack([x, x[::-1]]) for x in (q, k, v)]  # (2, B, T, N, H)
        fn = lambda q, k, v: self.attention(q, k, v, is_causal=True)
        got = jax.vmap(fn)(*stacked)
        for i in range(2):
            want = fn(*(x[i] for x in stacked))
            assert testing.relative_error(got[i], want) <= 1e-6

    def test_no_retrace(self):
        import chex

        q, k, v = self.qkv(16, seq_q=24, seq_k=24, num_heads=N, num_kv_heads=K, head_dim=H)

        chex.clear_trace_counter()

        @jax.jit
        @chex.assert_max_traces(n=1)
        def f(q, k, v):
            return self.attention(q, k, v, is_causal=True)

        f(q, k, v).block_until_ready()
        f(q + 1, k, v * 2).block_until_ready()  # new values, same shapes: no retrace

    def test_score_fn_closure_gets_gradients(self):
        """Arrays a score_fn closes over (learned slopes, a position table) are differentiated."""
        q, k, v = self.qkv(17, seq_q=21, seq_k=21, num_heads=N, num_kv_heads=K, head_dim=H)
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

    # ---------------------------------------------------------------- edge rules (DESIGN §3)

    def _small(self, seed=21, T=13, S=11, dtype=None):
        kw = dict(seq_q=T, seq_k=S, num_heads=N, num_kv_heads=K, head_dim=H)
        return self.qkv(seed, **kw, **({} if dtype is None else {"dtype": dtype}))

    @pytest.mark.parametrize(
        "kwargs,equivalent",
        [
            ({"local_window_size": (0, 2**31 - 1)}, {"local_window_size": (0, 64)}),
            ({"local_window_size": 2**31 - 1, "q_offset": 5}, {}),
            (
                {"local_window_size": (2**31 - 1, 3), "is_causal": True, "q_offset": 2**31 - 20},
                {"is_causal": True, "q_offset": 2**31 - 20},
            ),
            ({"is_causal": True, "q_offset": jnp.array([2**31 - 13, -(2**31)])}, None),
            ({"local_window_size": (2, 2**31 - 1), "q_offset": -(2**31)}, None),
        ],
    )
    def test_huge_windows_and_offsets_do_not_wrap(self, kwargs, equivalent):
        """Window bounds and offsets near the int32 limits: exact, never wrapped to zeros."""
        q, k, v = self._small()
        self.check(q, k, v, **kwargs)
        if equivalent is not None:  # "no limit" written as 2^31 − 1 means no limit
            want = chunkattn.reference_attention(q, k, v, **equivalent)
            got = self.attention(q, k, v, **kwargs)
            assert testing.relative_error(got, want) <= testing.tolerance(q.dtype)
            assert np.abs(np.asarray(got)).max() > 0.1

    def test_huge_negative_bias_gives_the_softmax_and_minus_inf_bias_masks(self):
        """A finite bias, however negative, gives the softmax; −inf on every key masks the row
        (output 0) with no NaN gradient, even through the returned lse."""
        q, k, v = self._small(seed=22)
        T, S = q.shape[1], k.shape[1]
        for value in (-1e30, float(np.finfo(np.float32).min)):
            bias = jnp.zeros((B, 1, T, S)).at[0, :, 3].set(value)  # row 3 of batch 0
            out = np.asarray(self.attention(q, k, v, bias))
            uniform = np.asarray(v[0]).mean(axis=0)  # (K, H): every key weighs the same
            row = out[0, 3].reshape(K, N // K, v.shape[-1])
            np.testing.assert_allclose(row, np.repeat(uniform[:, None], N // K, 1), atol=1e-5)
        # Against the reference at −100: scores of magnitude M carry float32's rounding of s
        # itself (relative M·2^-24 in the weights, the reference's too; README: numerics).
        self.check(q, k, v, jnp.zeros((B, 1, T, S)).at[0, :, 3].set(-100.0))
        bias = jnp.zeros((B, 1, T, S)).at[0, :, 3].set(-jnp.inf)

        def loss(q, k, v, bias):
            out, lse = self.attention(q, k, v, bias, return_lse=True)
            return jnp.sum(out**2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

        out = np.asarray(self.attention(q, k, v, bias))
        assert np.all(out[0, 3] == 0) and np.all(np.isfinite(out))
        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g))), "NaN gradient from a −inf bias row"

    @pytest.mark.parametrize("cap", [float("inf"), 0.0, -1.0, float("nan")])
    def test_invalid_soft_cap_is_refused(self, cap):
        q, k, v = self._small()
        with pytest.raises(ValueError, match="logits_soft_cap"):
            self.attention(q, k, v, logits_soft_cap=cap)

    def test_user_functions_are_checked(self):
        q, k, v = self._small()
        with pytest.raises(ValueError, match="mask_fn must return bool"):
            self.attention(q, k, v, mask_fn=lambda b, h, i, j: (j <= i).astype(jnp.int32))
        with pytest.raises(ValueError, match="mask_fn must take 4 arguments"):
            self.attention(q, k, v, mask_fn=lambda i, j: j <= i)
        with pytest.raises(ValueError, match="score_fn must take 5 arguments"):
            self.attention(q, k, v, score_fn=lambda s, i, j: s)

    @pytest.mark.parametrize(
        "window,ok",
        [(jnp.array([3, 2]), True), (np.int64(4), True), (3.0, False), ((1, -1), False)],
    )
    def test_window_types(self, window, ok):
        q, k, v = self._small()
        if ok:
            self.check(q, k, v, local_window_size=window, grads=False)
        else:
            with pytest.raises(ValueError, match="local_window_size"):
                self.attention(q, k, v, local_window_size=window)

    @pytest.mark.parametrize("axis", ["B", "N", "T", "S"])
    def test_zero_size(self, axis):
        """Zero batch, heads or length: outputs of the right shape, as jax.nn returns."""
        q, k, v = self._small()
        if axis == "B":
            q, k, v = q[:0], k[:0], v[:0]
        elif axis == "N":
            q, k, v = q[:, :, :0], k[:, :, :0], v[:, :, :0]
        elif axis == "T":
            q = q[:, :0]
        else:
            k, v = k[:, :0], v[:, :0]
        out, lse = self.attention(q, k, v, return_lse=True, is_causal=True)
        assert out.shape == q.shape[:3] + v.shape[-1:] and out.dtype == q.dtype
        assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
        g = jax.grad(lambda q: jnp.sum(self.attention(q, k, v)))(q)
        assert g.shape == q.shape

    def test_segment_ids_keep_their_values(self):
        """uint32 ids above 2^31 compare exactly; 64-bit ids that do not fit int32 are refused."""
        q, k, v = self._small(T=12, S=12)
        big = jnp.array(np.tile(np.repeat([2**31 + 5, 5], 6), (B, 1)), jnp.uint32)
        self.check(q, k, v, segment_ids=big)
        wide = np.tile(np.repeat([2**40, 0], 6), (B, 1)).astype(np.int64)
        with pytest.raises(ValueError, match="segment_ids"):
            self.attention(q, k, v, segment_ids=wide)

    def test_closures_over_traced_values(self):
        """mask_fn/score_fn closing over a learned value, a scan carry, a checkpointed or
        jitted value: they work, and the score_fn's gets its gradient."""
        q, k, v = self._small(seed=23)

        def loss(fn, c):
            out = fn(
                q,
                k,
                v,
                mask_fn=lambda b, h, i, j: j <= i + (c > 0).astype(jnp.int32),
                score_fn=lambda s, b, h, i, j: s - c * jnp.abs(i - j).astype(jnp.float32),
            )
            return jnp.sum(out**2)

        for wrap in (lambda f: f, jax.checkpoint, jax.jit):
            got = jax.grad(wrap(lambda c: loss(self.attention, c)))(0.3)
            want = jax.grad(lambda c: loss(chunkattn.reference_attention, c))(0.3)
            assert abs(float(got) - float(want)) <= 1e-4 * max(1.0, abs(float(want)))

        def scan_body(carry, shift):
            out = self.attention(q, k, v, mask_fn=lambda b, h, i, j: j <= i + shift)
            return carry + jnp.sum(out), None

        got = jax.lax.scan(scan_body, 0.0, jnp.arange(3))[0]
        want = sum(
            jnp.sum(
                chunkattn.reference_attention(q, k, v, mask_fn=lambda b, h, i, j, s=s: j <= i + s)
            )
            for s in range(3)
        )
        assert abs(float(got) - float(want)) <= 1e-4 * abs(float(want))

    def test_debug_infs_and_nans_are_clean_on_valid_input(self):
        q, k, v = self._small(seed=24)
        bias = jax.random.normal(_key(25), (1, N, 1, k.shape[1]))
        for flag in (jax.debug_infs, jax.debug_nans):
            with flag(True):
                for kw in ({"is_causal": True}, {"local_window_size": 2, "bias": bias}):
                    out = self.attention(q, k, v, **kw)
                    g = jax.grad(lambda q, kw=kw: jnp.sum(self.attention(q, k, v, **kw) ** 2))(q)
                    assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(g))

    def test_float64_under_x64(self):
        """Under jax_enable_x64 float64 inputs (and int64 masks' indices) match the float64
        reference at float64 tolerance, forward and gradients."""
        with jax.enable_x64(True):
            q, k, v = self._small(seed=26, dtype=jnp.float64)
            mask = jax.random.bernoulli(_key(27), 0.8, (B, 1, q.shape[1], k.shape[1]))
            seg_q = jnp.asarray(np.tile(np.repeat([0, 1], [6, 7]), (B, 1)), jnp.int64)
            seg = (seg_q, seg_q[:, : k.shape[1]])
            self.check(q, k, v, mask=mask, is_causal=True, score_fn=_alibi)
            self.check(q, k, v, jnp.ones((1, N, 1, k.shape[1]), jnp.float64), segment_ids=seg)
            q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
            self.check(q32, k32, v32, mask=mask, q_offset=jnp.array([1, 2], jnp.int64))

    def test_higher_order_derivatives_work_or_name_the_feature(self):
        q, k, v = self._small(seed=28)
        kw = dict(implementation=self.implementation, config=self.config, is_causal=True)
        f = lambda q: jnp.sum(chunkattn.dot_product_attention(q, k, v, **kw) ** 2)
        try:
            got = jax.grad(lambda q: jnp.sum(jax.grad(f)(q) ** 2))(q)
        except NotImplementedError as e:
            assert "second-order" in str(e)
        else:
            g = lambda q: jnp.sum(chunkattn.reference_attention(q, k, v, is_causal=True) ** 2)
            want = jax.grad(lambda q: jnp.sum(jax.grad(g)(q) ** 2))(q)
            assert testing.relative_error(got, want) <= 1e-3
