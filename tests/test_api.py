"""The public boundary: bad input raises ValueError naming the argument and its shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chunkattn
from chunkattn import testing

q, k, v = testing.random_qkv(
    jax.random.PRNGKey(0), batch=2, seq_q=8, seq_k=12, num_heads=4, num_kv_heads=2, head_dim=16
)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((q[0, 0], k, v), {}, r"query must be \[B, T, N, H\].*query.shape=\(4, 16\)"),
        ((q, k[0], v), {}, r"key must have the rank of query.*key.shape=\(12, 2, 16\)"),
        ((q, k[:1], v[:1]), {}, r"batch size.*key.shape=\(1, 12, 2, 16\)"),
        ((q, k, v[:, :5]), {}, r"sequence length S.*value.shape=\(2, 5, 2, 16\)"),
        ((q, k[..., :8], v), {}, r"head dim H.*key.shape=\(2, 12, 2, 8\)"),
        ((q[:, :, :3], k, v), {}, r"multiple of kv heads K=2.*query.shape=\(2, 8, 3, 16\)"),
        ((q, k, v[:, :, :1]), {}, r"number of kv heads.*value.shape=\(2, 12, 1, 16\)"),
        ((q, k.astype(jnp.bfloat16), v), {}, r"share a dtype"),
        ((q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32)), {}, r"floating point"),
        (
            (q, k, v, jnp.zeros((2, 4, 8, 5))),
            {},
            r"bias must be broadcastable.*bias.shape=\(2, 4, 8, 5\)",
        ),
        ((q, k, v, jnp.zeros((3, 1, 1, 1))), {}, r"bias must be broadcastable.*\(3, 1, 1, 1\)"),
        ((q, k, v, jnp.zeros((1, 2, 4, 8, 12))), {}, r"bias must be broadcastable"),
        ((q, k, v, None, jnp.ones((8, 11), bool)), {}, r"mask must be broadcastable.*\(8, 11\)"),
        ((q, k, v, None, jnp.ones((8, 12))), {}, r"mask must be bool.*float32"),
        ((q, k, v), {"segment_ids": jnp.zeros((2, 8), jnp.int32)}, r"T == S.*\(2, 8\)"),
        (
            (q, k, v),
            {"segment_ids": (jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 11), jnp.int32))},
            r"kv_segment_ids must have shape \(2, 12\), got \(2, 11\)",
        ),
        ((q, k, v), {"segment_ids": (jnp.zeros((2, 8)), jnp.zeros((2, 12)))}, r"integer"),
        (
            (q, k, v),
            {"query_seq_lengths": jnp.array([3, 4, 5])},
            r"query_seq_lengths must be \[B\]=\(2,\).*\(3,\)",
        ),
        ((q, k, v), {"key_value_seq_lengths": jnp.array(4)}, r"key_value_seq_lengths must be"),
        ((q, k, v), {"key_value_seq_lengths": jnp.array([1.0, 2.0])}, r"must be integer"),
        ((q, k, v), {"q_offset": jnp.array([1, 2, 3])}, r"q_offset must be.*\(3,\)"),
        ((q, k, v), {"dropout_rate": 1.0, "dropout_rng": jax.random.PRNGKey(0)}, r"dropout_rate"),
        ((q, k, v), {"dropout_rate": -0.1}, r"dropout_rate"),
        ((q, k, v), {"dropout_rate": 0.1}, r"needs dropout_rng"),
        ((q, k, v), {"local_window_size": -1}, r"local_window_size"),
        ((q, k, v), {"local_window_size": (1, 2, 3)}, r"local_window_size"),
        ((q, k, v), {"logits_soft_cap": 0.0}, r"logits_soft_cap"),
        ((q, k, v), {"implementation": "flash"}, r"implementation must be.*'flash'"),
        ((q, k, v), {"config": {"q_chunk_size": 8}}, r"config must be"),
        ((q, k, v), {"mask_fn": 3}, r"mask_fn must be callable"),
        ((q, k, v), {"scale": jnp.ones(3)}, r"scale must be a concrete number.*\(3,\)"),
    ],
)
def test_bad_input_raises_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        chunkattn.dot_product_attention(*args, **kwargs)


def test_a_traced_scale_is_refused_by_name_and_a_concrete_one_accepted():
    f = jax.jit(lambda q, s: chunkattn.dot_product_attention(q, k, v, scale=s))
    with pytest.raises(ValueError, match="scale must be a concrete number"):
        f(q, 0.5)
    got = chunkattn.dot_product_attention(q, k, v, scale=jnp.float32(0.5))
    want = chunkattn.dot_product_attention(q, k, v, scale=0.5)
    assert testing.relative_error(got, want) == 0.0


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"q_chunk_size": 0}, "q_chunk_size"),
        ({"kv_chunk_size": -4}, "kv_chunk_size"),
        ({"kv_chunk_size": 2.5}, "kv_chunk_size"),
        ({"q_chunk_size": True}, "q_chunk_size"),
    ],
)
def test_chunk_config_is_validated(kwargs, field):
    with pytest.raises(ValueError, match=f"ChunkConfig.{field}"):
        chunkattn.ChunkConfig(**kwargs)


def test_chunk_config_is_frozen():
    cfg = chunkattn.ChunkConfig(64, 64)
    with pytest.raises(AttributeError):
        cfg.q_chunk_size = 3  # type: ignore[misc]


def test_pallas_on_cpu_is_not_implemented_and_auto_falls_back(monkeypatch):
    monkeypatch.delenv("CHUNKATTN_PALLAS_INTERPRET", raising=False)
    if jax.default_backend() == "gpu":
        pytest.skip("CPU-only behaviour")
    with pytest.raises(NotImplementedError, match="GPU"):
        chunkattn.dot_product_attention(q, k, v, implementation="pallas")
    out = chunkattn.dot_product_attention(q, k, v)
    ref = chunkattn.reference_attention(q, k, v)
    assert testing.relative_error(out, ref) < 1e-5


def test_mask_is_sliced_not_broadcast():
    """A [1, N, 1, S] bias stays that size: its gradient has the bias's own shape."""
    bias = jnp.zeros((1, 4, 1, 12))
    g = jax.grad(lambda b: jnp.sum(chunkattn.dot_product_attention(q, k, v, b) ** 2))(bias)
    assert g.shape == bias.shape
    assert np.all(np.isfinite(np.asarray(g)))


def test_tracing_under_jit_with_traced_offsets_and_lengths():
    f = jax.jit(
        lambda q, k, v, off, lens: chunkattn.dot_product_attention(
            q, k, v, is_causal=True, q_offset=off, key_value_seq_lengths=lens
        )
    )
    off, lens = jnp.array([4, 0]), jnp.array([12, 5])
    got = f(q, k, v, off, lens)
    want = chunkattn.reference_attention(
        q, k, v, is_causal=True, q_offset=off, key_value_seq_lengths=lens
    )
    assert testing.relative_error(got, want) < 1e-5


def test_reference_agrees_with_jax_nn_where_defined():
    """The oracle's mask semantics equal jax.nn.dot_product_attention's (rows that see a key)."""
    qq, kk, vv = testing.random_qkv(
        jax.random.PRNGKey(3), seq_q=12, seq_k=12, num_heads=4, num_kv_heads=2, head_dim=16
    )
    bias = jax.random.normal(jax.random.PRNGKey(4), (1, 4, 12, 12))
    mask = jax.random.bernoulli(jax.random.PRNGKey(5), 0.8, (2, 1, 12, 12))
    lens = jnp.array([12, 7])
    for kw in [
        dict(is_causal=True),
        dict(local_window_size=(2, 1)),
        dict(bias=bias, mask=mask),
        dict(query_seq_lengths=lens, key_value_seq_lengths=lens, is_causal=True),
    ]:
        want = jax.nn.dot_product_attention(qq, kk, vv, implementation="xla", **kw)
        got = chunkattn.reference_attention(qq, kk, vv, **kw)
        rows = np.asarray(jnp.any(jnp.asarray(got) != 0, axis=(-1, -2)))  # rows that saw a key
        np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=2e-5)


def test_cudnn_serves_what_it_can_and_names_what_it_cannot():
    """implementation="cudnn" routes to jax.nn's cuDNN kernel; features it lacks are named."""
    q = k = v = jnp.ones((1, 8, 2, 16), jnp.bfloat16)
    cases = [
        ({"segment_ids": jnp.zeros((1, 8), jnp.int32)}, "segment_ids"),
        ({"logits_soft_cap": 2.0}, "logits_soft_cap"),
        ({"q_offset": 3, "is_causal": True}, "q_offset"),
        ({"return_lse": True}, "return_lse"),
        ({"mask_fn": lambda b, h, i, j: j <= i}, "mask_fn"),
    ]
    for kwargs, name in cases:
        with pytest.raises(NotImplementedError, match=name):
            chunkattn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)
    with pytest.raises(NotImplementedError, match="float32 inputs"):
        chunkattn.dot_product_attention(
            *(x.astype(jnp.float32) for x in (q, k, v)), implementation="cudnn"
        )
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match="GPU"):
            chunkattn.dot_product_attention(q, k, v, implementation="cudnn", is_causal=True)
    else:
        got = chunkattn.dot_product_attention(q, k, v, implementation="cudnn", is_causal=True)
        want = chunkattn.reference_attention(q, k, v, is_causal=True)
        assert testing.relative_error(got, want) <= testing.tolerance(q.dtype)
