"""Shared helpers for tests and benchmarks: random inputs, the tolerance table, comparisons.

One tolerance table serves every implementation (DESIGN §4): errors are measured against
`reference_attention` on float32-upcast inputs, as max|x − ref| / max(1, max|ref|) per output
(a relative-to-scale error that stays meaningful when outputs are near zero).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from chunkattn.reference import reference_attention

Array = jax.Array

# Forward tolerance per input dtype; gradients get GRAD_FACTOR times as much.
TOLERANCES: dict[Any, float] = {
    jnp.dtype(jnp.float32): 1e-5,
    jnp.dtype(jnp.bfloat16): 1e-2,
    jnp.dtype(jnp.float16): 2e-3,
    jnp.dtype(jnp.float64): 1e-12,  # under x64
}
GRAD_FACTOR = 2.0


def tolerance(dtype: Any, *, grad: bool = False) -> float:
    """The tolerance for `dtype` (forward, or gradients with grad=True)."""
    # One table for every backend: float32 requests never run as TF32 (see api.py).
    return TOLERANCES[jnp.dtype(dtype)] * (GRAD_FACTOR if grad else 1.0)


def random_qkv(
    key: Array,
    *,
    batch: int | None = 2,
    seq_q: int = 64,
    seq_k: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    head_dim: int = 32,
    head_dim_v: int | None = None,
    dtype: Any = jnp.float32,
) -> tuple[Array, Array, Array]:
    """Standard-normal q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv] (no B if batch=None)."""
    seq_k = seq_q if seq_k is None else seq_k
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    lead = () if batch is None else (batch,)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (*lead, seq_q, num_heads, head_dim), jnp.float32)
    k = jax.random.normal(kk, (*lead, seq_k, num_kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(kv, (*lead, seq_k, num_kv_heads, head_dim_v), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def relative_error(x: Any, ref: Any) -> float:
    """max|x − ref| / max(1, max|ref|), in float64; inf if x has a NaN where ref does not."""
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(np.isfinite(x), finite) or not np.array_equal(x[~finite], ref[~finite]):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(1.0, float(np.max(np.abs(ref[finite]))))
    return float(np.max(np.abs(x[finite] - ref[finite]))) / scale


def _upcast(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda a: (
            a.astype(jnp.promote_types(a.dtype, jnp.float32))
            if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating)
            else a
        ),
        tree,
    )


def assert_matches_reference(
    fn: Callable[..., Any],
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    *,
    grads: bool = True,
    return_lse: bool = True,
    tol_scale: float = 1.0,
    **kwargs: Any,
) -> None:
    """Check fn(q, k, v, bias, **kwargs) against `reference_attention` (forward, lse, gradients).

    Gradients are of a fixed random projection of the output (and of the lse where finite),
    with respect to query, key, value, bias and sinks (when given). Raises AssertionError naming
    the worst output.
    """
    dtype = query.dtype
    sinks = kwargs.pop("sinks", None)
    ref_args = _upcast((query, key, value, bias, sinks))

    # Whole computations under jit: one compile each instead of op-by-op dispatch.
    def forward(f):
        return jax.jit(lambda q, k, v, b, s: f(q, k, v, b, sinks=s, return_lse=True, **kwargs))

    out, lse = forward(fn)(query, key, value, bias, sinks)
    ref_out, ref_lse = forward(reference_attention)(*ref_args)
    assert out.dtype == dtype, f"output dtype {out.dtype} != input dtype {dtype}"
    assert out.shape == ref_out.shape, f"output shape {out.shape} != {ref_out.shape}"
    tol = tolerance(dtype) * tol_scale
    tol_g = tolerance(dtype, grad=True) * tol_scale
    errors = {"out": relative_error(out, ref_out)}
    if return_lse:
        errors["lse"] = relative_error(lse, ref_lse)
    if grads:
        proj = jax.random.normal(jax.random.PRNGKey(17), out.shape, jnp.float32)
        lse_proj = jax.random.normal(jax.random.PRNGKey(18), lse.shape, jnp.float32)

        def loss(f, q, k, v, b, s):
            o, l = f(q, k, v, b, sinks=s, return_lse=True, **kwargs)
            l = jnp.where(jnp.isfinite(l), l, 0.0)
            return jnp.sum(o.astype(jnp.float32) * proj) + 0.1 * jnp.sum(l * lse_proj)

        names = [n for n, x in (("dbias", bias), ("dsinks", sinks)) if x is not None]
        argnums = (0, 1, 2) + tuple(3 + ("dbias", "dsinks").index(n) for n in names)
        got = jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=argnums))(
            query, key, value, bias, sinks
        )
        want = jax.jit(jax.grad(lambda *a: loss(reference_attention, *a), argnums=argnums))(
            *ref_args
        )
        for name, g, w in zip(("dq", "dk", "dv", *names), got, want, strict=True):
            assert g.shape == w.shape, f"{name} shape {g.shape} != {w.shape}"
            errors[name] = relative_error(g, w)
    bad = {n: e for n, e in errors.items() if not e <= (tol if n in ("out", "lse") else tol_g)}
    assert not bad, f"mismatch vs reference (tol {tol:g}, grads {tol_g:g}): {bad}"
