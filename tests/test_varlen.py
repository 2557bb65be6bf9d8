"""varlen_attention against a per-sequence loop of the reference, and the block skipping by
segment ranges (masks.kv_chunk_range / q_chunk_range) that makes packed documents cost Σ Tᵢ²."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chunkattn
from chunkattn import masks, testing

# Odd lengths with an empty and a one-token sequence; 3 padding tokens past cu[-1].
LENGTHS_Q = (5, 0, 1, 17, 9)
LENGTHS_K = (3, 4, 0, 11, 13)  # a different packing (cross-attention): sequence 2 sees no key
PAD = 3
CHUNKS = chunkattn.ChunkConfig(q_chunk_size=8, kv_chunk_size=8)  # tails, many blocks


def _cu(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def _inputs(lengths_q, lengths_k, *, num_heads=4, num_kv_heads=2, head_dim=16, head_dim_v=None):
    total_q, total_k = sum(lengths_q) + PAD, sum(lengths_k) + PAD
    q, _, _ = testing.random_qkv(
        jax.random.PRNGKey(0), batch=None, seq_q=total_q, num_heads=num_heads, head_dim=head_dim
    )
    _, k, v = testing.random_qkv(
        jax.random.PRNGKey(1),
        batch=None,
        seq_q=total_k,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        head_dim_v=head_dim_v,
    )
    return q, k, v, _cu(lengths_q), _cu(lengths_k)


def per_sequence_reference(q, k, v, cu_q, cu_k, **kwargs):
    """(out [total_q, N, Hv], lse [N, total_q]): reference_attention on each sequence alone."""
    num_heads, head_dim_v = q.shape[1], v.shape[-1]
    sinks = kwargs.get("sinks")

    def no_key_lse(rows):  # a row with no key: lse −inf, or only its head's sink
        if sinks is None:
            return jnp.full((num_heads, rows), -jnp.inf)
        return jnp.broadcast_to(sinks.astype(jnp.float32)[:, None], (num_heads, rows))

    outs, lses = [], []
    for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], strict=True):
        if b == a:
            continue
        if d == c:  # no key: the documented empty-row result
            outs.append(jnp.zeros((b - a, num_heads, head_dim_v), q.dtype))
            lses.append(no_key_lse(b - a))
            continue
        o, l = chunkattn.reference_attention(q[a:b], k[c:d], v[c:d], return_lse=True, **kwargs)
        outs.append(o)
        lses.append(l)
    pad = q.shape[0] - cu_q[-1]
    outs.append(jnp.zeros((pad, num_heads, head_dim_v), q.dtype))
    lses.append(no_key_lse(pad))
    return jnp.concatenate(outs), jnp.concatenate(lses, axis=1)


def _loss(fn, proj, lse_proj):
    """A scalar of (out, lse) through fixed random projections; (out, lse) as the aux."""

    def loss(q, k, v):
        o, l = fn(q, k, v)
        finite = jnp.where(jnp.isfinite(l), l, 0.0)
        return jnp.sum(o.astype(jnp.float32) * proj) + 0.1 * jnp.sum(finite * lse_proj), (o, l)

    return loss


def assert_close(fn, want_fn, q, k, v):
    """fn(q, k, v) -> (out, lse) against want_fn: forward, lse and gradients, at the f32 table.

    One compiled program per side (forward and gradients together). Returns fn's (out, lse).
    """
    proj = jax.random.normal(jax.random.PRNGKey(7), (q.shape[0], q.shape[1], v.shape[-1]))
    lse_proj = jax.random.normal(jax.random.PRNGKey(8), (q.shape[1], q.shape[0]))

    def run(f):
        grad = jax.grad(_loss(f, proj, lse_proj), argnums=(0, 1, 2), has_aux=True)
        return jax.jit(grad)(q, k, v)  # jitted: the reference's loop would dispatch op by op

    (g, got), (w, want) = run(fn), run(want_fn)
    errors = {"out": testing.relative_error(got[0], want[0])}
    errors["lse"] = testing.relative_error(got[1], want[1])
    for name, a, b in zip(("dq", "dk", "dv"), g, w, strict=True):
        errors[name] = testing.relative_error(a, b)
    tol, tol_g = testing.tolerance(q.dtype), testing.tolerance(q.dtype, grad=True)
    bad = {n: e for n, e in errors.items() if not e <= (tol if n in ("out", "lse") else tol_g)}
    assert not bad, f"mismatch (tol {tol:g}, grads {tol_g:g}): {bad}"
    return got


CASES = {
    # causal per sequence, GQA, soft cap, attention sinks
    "causal": dict(is_causal=True, logits_soft_cap=5.0, sinks=jnp.array([-1.0, 0.0, 0.5, 2.0])),
    # a window (left, right) placed by an offset, the same in every sequence
    "window_offset": dict(local_window_size=(3, 1), q_offset=2),
    # query sequence i attends key sequence i of a different packing; value head dim ≠ key's
    "cross": dict(),
}


@pytest.mark.parametrize(
    "implementation, case",
    [("chunked", c) for c in CASES] + [("xla", "causal"), ("xla", "cross")],
)
def test_matches_a_loop_over_sequences(implementation, case):
    kwargs = CASES[case]
    lengths_k = LENGTHS_K if case == "cross" else LENGTHS_Q
    q, k, v, cu_q, cu_k = _inputs(LENGTHS_Q, lengths_k, head_dim_v=8 if case == "cross" else None)
    config = CHUNKS if implementation == "chunked" else None

    def fn(q, k, v):
        return chunkattn.varlen_attention(
            q,
            k,
            v,
            jnp.asarray(cu_q),
            jnp.asarray(cu_k),
            max_seqlen_q=max(LENGTHS_Q),
            max_seqlen_k=max(lengths_k),
            return_lse=True,
            implementation=implementation,
            config=config,
            **kwargs,
        )

    assert_close(fn, lambda q, k, v: per_sequence_reference(q, k, v, cu_q, cu_k, **kwargs), q, k, v)


def test_pallas_interpreted_matches_a_loop_over_sequences(monkeypatch):
    """Forward only: interpreting the backward kernels is slow, and tests/test_pallas.py runs
    them with segment ids; this checks what varlen hands the kernels."""
    from chunkattn.pallas import PallasConfig

    if jax.default_backend() != "gpu":
        monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")
    q, k, v, cu_q, cu_k = _inputs(LENGTHS_Q, LENGTHS_Q)
    config = PallasConfig(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)

    def fn(q, k, v):
        return chunkattn.varlen_attention(
            q, k, v, cu_q, cu_k, max_seqlen_q=17, max_seqlen_k=17, is_causal=True,
            return_lse=True, implementation="pallas", config=config,
        )  # fmt: skip

    got = jax.jit(fn)(q, k, v)
    want = jax.jit(lambda *a: per_sequence_reference(*a, cu_q, cu_k, is_causal=True))(q, k, v)
    for name, a, b in zip(("out", "lse"), got, want, strict=True):
        assert testing.relative_error(a, b) <= testing.tolerance(jnp.float32), name


def _packed_segment_ids(cu, total, pad):
    """Ascending ids (how users pack by hand), `pad` past cu[-1]."""
    ids = np.full(total, pad, np.int32)
    for i, (a, b) in enumerate(itertools.pairwise(cu)):
        ids[a:b] = i
    return jnp.asarray(ids)


def test_dropout_draws_the_packed_positions_mask():
    """Dropout positions are packed positions: the same as dot_product_attention on the packed
    arrays with the equivalent segment ids, forward and gradients."""
    q, k, v, cu, _ = _inputs(LENGTHS_Q, LENGTHS_Q)
    total = q.shape[0]
    seg = (_packed_segment_ids(cu, total, -1), _packed_segment_ids(cu, total, -2))
    drop = dict(dropout_rate=0.3, dropout_rng=jax.random.PRNGKey(3), broadcast_dropout=False)
    common = dict(is_causal=True, return_lse=True, implementation="chunked", config=CHUNKS)

    def fn(q, k, v):
        return chunkattn.varlen_attention(
            q, k, v, cu, cu, max_seqlen_q=17, max_seqlen_k=17, **common, **drop
        )

    def want(q, k, v):
        return chunkattn.dot_product_attention(q, k, v, segment_ids=seg, **common, **drop)

    out, _ = assert_close(fn, want, q, k, v)
    undropped = chunkattn.reference_attention(q, k, v, segment_ids=seg, is_causal=True)
    assert testing.relative_error(out, undropped) > 0.1  # dropout did act


def _count_blocks(fn):
    """(result, blocks): fn(mask_fn) with a mask_fn that counts the blocks it is evaluated on.

    With segment ids no block is classified full, so the chunked core evaluates the mask on
    every block it visits: the count is the number of blocks computed.
    """
    calls = []

    def mask_fn(b, h, q_pos, k_pos):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.ones((), bool)

    out = jax.block_until_ready(fn(mask_fn))
    jax.effects_barrier()
    return out, len(calls)


def test_many_short_documents_cost_only_their_blocks():
    """32 documents of 8 tokens in chunks of 8: 32 blocks forward, not 32² = 1024; the backward
    visits the same 32 again; the result is the per-document reference."""
    lengths = (8,) * 32
    cu = _cu(lengths)
    q, k, v = testing.random_qkv(jax.random.PRNGKey(0), batch=None, seq_q=256, head_dim=8)
    config = chunkattn.ChunkConfig(8, 8)

    def run(mask_fn, q=q):
        return chunkattn.varlen_attention(
            q, k, v, cu, cu, max_seqlen_q=8, max_seqlen_k=8, mask_fn=mask_fn,
            implementation="chunked", config=config,
        )  # fmt: skip

    out, forward = _count_blocks(run)
    assert forward == 32
    # Equal lengths: the loop over documents is a batch of 32.
    want = chunkattn.reference_attention(*(x.reshape(32, 8, *x.shape[1:]) for x in (q, k, v)))
    assert testing.relative_error(out, want.reshape(out.shape)) <= testing.tolerance(jnp.float32)
    _, both = _count_blocks(lambda f: jax.grad(lambda q: run(f, q).sum())(q))
    assert both == 64

    # Without a config, chunks follow the documents: 8 of 256 tokens get chunks of 128, so
    # 8·2² = 32 blocks of 128², exactly the documents' pairs (the 512 default: 4 blocks of
    # 512², twice the scores, half of them masked).
    q8, k8, v8 = testing.random_qkv(jax.random.PRNGKey(1), batch=None, seq_q=2048, head_dim=8)
    cu8 = _cu((256,) * 8)
    _, forward = _count_blocks(
        lambda f: chunkattn.varlen_attention(
            q8,
            k8,
            v8,
            cu8,
            cu8,
            max_seqlen_q=256,
            max_seqlen_k=256,
            mask_fn=f,
            implementation="chunked",
        )
    )
    assert forward == 32

    # dot_product_attention(segment_ids=...) gets the same skipping, ids in any order.
    ids = jnp.asarray(np.random.default_rng(0).permutation(32).repeat(8))
    _, forward = _count_blocks(
        lambda f: chunkattn.dot_product_attention(
            q, k, v, segment_ids=ids, mask_fn=f, implementation="chunked", config=config
        )
    )
    assert forward == 32


def test_random_packing_visits_only_blocks_that_share_a_document():
    """Random document lengths, causal: the blocks visited are exactly the (q chunk, kv chunk)
    pairs that share a document and are not above the diagonal."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 25, size=12)
    cu = _cu(lengths)
    total = int(cu[-1])
    q, k, v = testing.random_qkv(jax.random.PRNGKey(2), batch=None, seq_q=total, head_dim=8)
    t = 8
    seq = np.searchsorted(cu, np.arange(total), side="right") - 1
    seq = np.concatenate([seq, np.full(-total % t, -7)])  # pad rows: they share nothing
    n = len(seq) // t
    need = sum(
        bool(np.intersect1d(seq[i * t : (i + 1) * t], seq[j * t : (j + 1) * t]).size) and j <= i
        for i in range(n)
        for j in range(n)
    )
    out, visited = _count_blocks(
        lambda f: chunkattn.varlen_attention(
            q,
            k,
            v,
            cu,
            cu,
            max_seqlen_q=24,
            max_seqlen_k=24,
            is_causal=True,
            mask_fn=f,
            implementation="chunked",
            config=chunkattn.ChunkConfig(t, t),
        )  # fmt: skip
    )
    assert visited == need < n * (n + 1) // 2
    want = jax.jit(lambda *a: per_sequence_reference(*a, cu, cu, is_causal=True)[0])(q, k, v)
    assert testing.relative_error(out, want) <= testing.tolerance(jnp.float32)


# --- the ranges themselves, on concrete arrays -----------------------------------------------


def _ranges(ids_q, ids_k, tq, tk, spec=None):
    """Per query chunk its kv range, per kv chunk its q range (lists of (lo, hi))."""
    spec = spec or masks.MaskSpec()
    batch = ids_q.shape[0]
    arrays = masks.MaskArrays(
        q_offset=jnp.zeros((batch,), jnp.int32),
        q_segment_ids=jnp.asarray(ids_q),
        kv_segment_ids=jnp.asarray(ids_k),
    )
    nq, nk = ids_q.shape[1] // tq, ids_k.shape[1] // tk
    kv = [
        tuple(map(int, masks.kv_chunk_range(spec, arrays, i * tq, tq, tk, nk))) for i in range(nq)
    ]
    qr = [tuple(map(int, masks.q_chunk_range(spec, arrays, j * tk, tq, tk, nq))) for j in range(nk)]
    return kv, qr


def _allowed_blocks(ids_q, ids_k, tq, tk, causal=False):
    """bool [nq, nk]: blocks holding at least one allowed (query, key) pair."""
    allowed = ids_q[:, :, None] == ids_k[:, None, :]  # (B, T, S)
    if causal:
        allowed &= np.tril(np.ones(allowed.shape[1:], bool))
    b, t, s = allowed.shape
    return allowed.reshape(b, t // tq, tq, s // tk, tk).any(axis=(0, 2, 4))


@pytest.mark.parametrize("order", ["sorted", "unsorted"])
@pytest.mark.parametrize("causal", [False, True])
def test_ranges_never_skip_an_allowed_block(order, causal):
    rng = np.random.default_rng(5)
    tq, tk, nq, nk = 4, 6, 9, 6
    ids_q = np.sort(rng.integers(0, 12, size=(2, tq * nq)), axis=1)
    ids_k = np.sort(rng.integers(0, 12, size=(2, tk * nk)), axis=1)
    if order == "unsorted":
        ids_q, ids_k = rng.permuted(ids_q, axis=1), rng.permuted(ids_k, axis=1)
    kv, qr = _ranges(ids_q, ids_k, tq, tk, masks.MaskSpec(is_causal=causal))
    need = _allowed_blocks(ids_q, ids_k, tq, tk, causal)
    for i, j in zip(*np.nonzero(need), strict=True):
        assert kv[i][0] <= j < kv[i][1] and qr[j][0] <= i < qr[j][1], (i, j, kv[i], qr[j])
    if order == "sorted" and not causal:  # tight: the first to the last block that meets
        for i in range(nq):
            js = np.nonzero(need[i])[0]
            assert kv[i] == ((js[0], js[-1] + 1) if js.size else (kv[i][0], kv[i][0]))


def test_ranges_keep_the_first_and_last_chunk_when_only_they_meet():
    """Unsorted ids: the query chunk's id appears only in the first and the last key chunk."""
    ids_q = np.full((1, 4), 7)
    ids_k = np.concatenate([np.full(4, 7), np.full(4 * 5, 100), np.full(4, 7)])[None]
    kv, qr = _ranges(ids_q, ids_k, 4, 4)
    assert kv == [(0, 7)]
    assert qr == [(0, 1)] + [(0, 0)] * 5 + [(0, 1)]
    # ... and the other batch entry's ids count too: a chunk meets if it meets in any entry.
    two_q = np.concatenate([ids_q, np.full((1, 4), 5)])
    two_k = np.concatenate([ids_k, np.full((1, 28), 5)])
    kv, qr = _ranges(two_q, two_k, 4, 4)
    assert kv == [(0, 7)] and qr == [(0, 1)] * 7


def test_ranges_without_segment_ids_are_unchanged():
    arrays = masks.MaskArrays(q_offset=jnp.zeros((1,), jnp.int32))
    assert tuple(map(int, masks.kv_chunk_range(masks.MaskSpec(), arrays, 8, 4, 4, 5))) == (0, 5)
    causal = masks.MaskSpec(is_causal=True)
    assert tuple(map(int, masks.kv_chunk_range(causal, arrays, 8, 4, 4, 5))) == (0, 3)
    assert tuple(map(int, masks.q_chunk_range(causal, arrays, 8, 4, 4, 5))) == (2, 5)


# --- tracing and errors ----------------------------------------------------------------------


def test_traced_offsets_recompile_never_and_poison_what_they_cannot_serve():
    q, k, v, cu, _ = _inputs(LENGTHS_Q, LENGTHS_Q)
    traces = []

    @jax.jit
    def f(q, cu_q, cu_k):
        traces.append(1)
        return chunkattn.varlen_attention(
            q, k, v, cu_q, cu_k, max_seqlen_q=32, max_seqlen_k=32, is_causal=True,
            implementation="chunked", config=CHUNKS,
        )  # fmt: skip

    for offsets in (cu, _cu((10, 2, 0, 20, 0))):
        total = q.shape[0]
        seg = (_packed_segment_ids(offsets, total, -1), _packed_segment_ids(offsets, total, -2))
        want = chunkattn.reference_attention(q, k, v, segment_ids=seg, is_causal=True)
        assert testing.relative_error(f(q, offsets, offsets), want) <= 1e-5
    assert len(traces) == 1
    # causal with different packings, and invalid offsets: NaN, never a wrong number.
    shifted = cu + np.array([0, 0, 0, 1, 1, 0], np.int32)
    assert bool(jnp.isnan(f(q, cu, shifted)).all())
    for bad in (cu + 1, cu[::-1].copy(), cu + np.array([0, 0, 0, 0, 0, 99], np.int32)):
        assert bool(jnp.isnan(f(q, bad, bad)).all()), bad
    grad = jax.grad(lambda q: f(q, cu, shifted).sum())(q)
    assert bool(jnp.isnan(grad[: cu[-1]]).all())  # padding tokens past cu[-1] have no gradient


def _call(q=None, k=None, v=None, cu_q=None, cu_k=None, **kwargs):
    q0, k0, v0, cu0, _ = _inputs(LENGTHS_Q, LENGTHS_Q)
    kwargs = dict(dict(max_seqlen_q=17, max_seqlen_k=17), **kwargs)
    return chunkattn.varlen_attention(
        q0 if q is None else q,
        k0 if k is None else k,
        v0 if v is None else v,
        cu0 if cu_q is None else cu_q,
        cu0 if cu_k is None else cu_k,
        **kwargs,
    )


CU = _cu(LENGTHS_Q)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(q=jnp.zeros((1, 35, 4, 16))),
            r"q must be packed \[total_q, N, H\].*\(1, 35, 4, 16\)",
        ),
        (dict(k=jnp.zeros((35, 32))), r"k must be packed .*\(35, 32\)"),
        (dict(cu_q=CU.astype(np.float32)), r"cu_seqlens_q must be int32.*float32"),
        (dict(cu_k=CU[None]), r"cu_seqlens_k must be int32 \[num_seqs \+ 1\].*\(1, 6\)"),
        (dict(cu_k=np.zeros((0,), np.int32)), r"cu_seqlens_k.*\(0,\)"),
        (dict(cu_k=CU[:-1]), r"same number of sequences.*\(6,\).*\(5,\)"),
        (dict(cu_q=CU + 1), r"cu_seqlens_q must start at 0, got cu_seqlens_q\[0\]=1"),
        (dict(cu_q=CU[[0, 3, 2, 3, 4, 5]]), r"non-decreasing, got cu_seqlens_q\[1\]=6 > .*\[2\]=5"),
        (dict(cu_k=CU * 2), r"cu_seqlens_k\[-1\]=64 is past the 35 packed tokens"),
        (dict(max_seqlen_q=0), r"max_seqlen_q must be a positive int.*0"),
        (dict(max_seqlen_k=True), r"max_seqlen_k must be a positive int.*True"),
        (dict(max_seqlen_k=17.0), r"max_seqlen_k must be a positive int.*17.0"),
        (dict(max_seqlen_q=16), r"sequence 3 has 17 tokens.*more than max_seqlen_q=16"),
        (dict(segment_ids=jnp.zeros((35,), jnp.int32)), r"sets segment_ids from cu_seqlens"),
        (dict(query_seq_lengths=jnp.ones(())), r"sets query_seq_lengths"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)


def test_masks_across_different_packings_are_refused_by_name():
    cu_k = _cu(LENGTHS_K)
    for kw in (dict(is_causal=True), dict(local_window_size=4)):
        with pytest.raises(NotImplementedError, match=r"causal/window with cu_seqlens_q != cu_"):
            _call(cu_k=cu_k, max_seqlen_k=13, **kw)
