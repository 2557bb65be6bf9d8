"""Property-based fuzz: every path against the dense reference, forward and gradients.

Hypothesis draws a valid request (shapes, GQA, dtype, masks, windows with extreme bounds,
offsets near the int32 limits, biases with huge rows, soft caps, segment ids, lengths) and
checks `chunked` (random chunkings), `xla` and `pallas` (interpreted) against
`reference_attention` with the tolerance table of `chunkattn.testing`.

Profiles: "ci" (bounded, the default) and "long" (`CHUNKATTN_FUZZ=long`, thousands of cases;
run it by hand: `CHUNKATTN_FUZZ=long .venv/bin/python -m pytest -q tests/test_fuzz.py`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chunkattn
from chunkattn import testing

settings.register_profile(
    "ci", max_examples=5, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "long", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck)
)
PROFILE = os.environ.get("CHUNKATTN_FUZZ", "ci")
settings.load_profile(PROFILE)

INT32_MAX = 2**31 - 1
BIG_WINDOW = st.sampled_from([0, 1, 3, 17, 2**20, INT32_MAX])
OFFSET = st.one_of(st.integers(-40, 40), st.sampled_from([-(2**31), 2**30, INT32_MAX - 64]))


@st.composite
def requests(draw, dtypes=(jnp.float32, jnp.bfloat16, jnp.float16)):
    """(q, k, v, bias, kwargs, grads): a valid request; grads=False for huge-bias rows."""
    batch = draw(st.integers(1, 2))
    seq_q, seq_k = draw(st.integers(1, 33)), draw(st.integers(1, 33))
    num_kv_heads, groups = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([8, 16]))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    q, k, v = testing.random_qkv(
        jax.random.PRNGKey(seed),
        batch=batch,
        seq_q=seq_q,
        seq_k=seq_k,
        num_heads=num_kv_heads * groups,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
    )
    rng = np.random.default_rng(seed)
    kwargs: dict = {}
    if draw(st.booleans()):
        kwargs["is_causal"] = True
    if draw(st.booleans()):
        kwargs["local_window_size"] = (draw(BIG_WINDOW), draw(BIG_WINDOW))
    if draw(st.booleans()):
        offset = draw(OFFSET)
        kwargs["q_offset"] = min(offset, INT32_MAX - seq_q + 1)
    if draw(st.booleans()):
        kwargs["key_value_seq_lengths"] = jnp.asarray(rng.integers(0, seq_k + 2, batch))
    if draw(st.booleans()):
        kwargs["query_seq_lengths"] = jnp.asarray(rng.integers(0, seq_q + 2, batch))
    if draw(st.booleans()):
        seg_q = np.sort(rng.integers(0, 3, (batch, seq_q)), axis=1)
        seg_k = np.sort(rng.integers(0, 3, (batch, seq_k)), axis=1)
        kwargs["segment_ids"] = (jnp.asarray(seg_q, jnp.int32), jnp.asarray(seg_k, jnp.int32))
    if draw(st.booleans()):
        kwargs["logits_soft_cap"] = draw(st.sampled_from([0.5, 5.0, 1e4]))
    bias, grads = None, True
    if draw(st.booleans()):
        scale = draw(st.sampled_from([1.0, 30.0]))
        bias = rng.standard_normal((1, q.shape[2], seq_q, seq_k)) * scale
        if draw(st.booleans()):  # a row of huge finite negative bias: still the softmax
            bias[:, :, rng.integers(seq_q)] = draw(st.sampled_from([-1e30, -3e38, -1e4]))
            grads = False  # P = exp(s − lse) carries float32 lse: see README numerics
        bias = jnp.asarray(bias, jnp.float32)
    return q, k, v, bias, kwargs, grads


def _check(implementation, config, req):
    q, k, v, bias, kwargs, grads = req

    def fn(*args, **kw):
        return chunkattn.dot_product_attention(
            *args, implementation=implementation, config=config, **kw
        )

    testing.assert_matches_reference(fn, q, k, v, bias, grads=grads, **kwargs)


@given(requests(), st.integers(1, 16), st.integers(1, 16))
def test_chunked_matches_reference(req, tq, tk):
    _check("chunked", chunkattn.ChunkConfig(q_chunk_size=tq, kv_chunk_size=tk), req)


@given(requests())
def test_xla_matches_reference(req):
    _check("xla", None, req)


@settings(max_examples=2 if PROFILE == "ci" else 300)
@given(req=requests(dtypes=(jnp.float32, jnp.bfloat16)))
def test_pallas_interpreted_matches_reference(req, monkeypatch_env):
    from chunkattn.pallas import PallasConfig

    config = PallasConfig(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
    _check("pallas", config, req)


@settings(max_examples=3 if PROFILE == "ci" else 500)
@given(requests(dtypes=(jnp.float32,)), st.integers(1, 16), st.integers(1, 16))
def test_float64_under_x64(req, tq, tk):
    with jax.enable_x64(True):
        q, k, v, bias, kwargs, grads = req
        q, k, v = (x.astype(jnp.float64) for x in (q, k, v))
        bias = None if bias is None else bias.astype(jnp.float64)
        _check(
            "chunked",
            chunkattn.ChunkConfig(q_chunk_size=tq, kv_chunk_size=tk),
            (q, k, v, bias, kwargs, grads),
        )


@pytest.fixture(scope="module")
def monkeypatch_env():
    """The Pallas kernels run in the interpreter on CPU."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")
    yield
    mp.undo()
