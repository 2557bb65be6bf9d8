"""Delta-rule fast weights (Schlag et al. 2021) and the gated delta rule (Gated DeltaNet, Yang,
Kautz & Hatamizadeh 2024, arXiv 2412.06464), chunkwise-parallel (Yang et al. 2024,
arXiv 2406.06484).

    W_t = α_t W_{t−1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ,   y_t = W_t q_t,   α_t = exp(g_t) ≤ 1

(α_t = 1 without `log_decay`: the delta rule W_t = W_{t−1} + β_t (v_t − W_{t−1} k_t) k_tᵀ.)
The state is carried transposed, S = Wᵀ [B, N, Hk, Hv], so y_t = S_tᵀ q_t.

Per chunk of C tokens with state S₀ at its start and Γ_i = Σ_{j≤i} g_j (log decays summed from
the chunk start, inclusive), the WY/UT transform with the decay folded in is
    A_ij = β_i exp(Γ_i − Γ_j) k_iᵀk_j (j < i),   T = (I + A)⁻¹ diag(β),
    W' = T diag(e^Γ) K,   U' = T V − W' S₀                      (the corrected values)
    O = diag(e^Γ) Q S₀ + (tril(Q Kᵀ) ∘ exp(Γ_i − Γ_j)) U'
    S = e^{Γ_C} S₀ + (diag(exp(Γ_C − Γ)) K)ᵀ U'.
Every exponent is a difference Γ_i − Γ_j with j ≤ i, or Γ itself: at most 0 whenever g ≤ 0, so
nothing overflows however strong the decay (−20 per step gives Γ ≈ −1280 in a chunk of 64,
whose exp is 0, not inf); the entries above the diagonal are masked before the exp. Work
O(T·C·H + T·H²), float32.

(I + A)⁻¹ is computed by `_unit_lower_inverse` (recursive doubling on the diagonal blocks: log₂ C
levels of batched matmuls), not by `jax.scipy.linalg.solve_triangular`. On CPU the latter is a
LAPACK custom call (`lapack_strsm_ffi`, jaxlib 0.10) that, once batch · C³ ≥ 2·10⁵ (C = 64:
any B·N ≥ 2), splits its batch over XLA's intra-op thread pool and blocks in `ParallelBatchMap`
until the pieces finish. The backward pass has several independent solves per chunk (the
rematerialized forward one, two transposed ones), and XLA:CPU runs independent thunks
concurrently on that same pool; when every pool thread (2 on a 2-core machine) is blocked in
such a solve, nothing is left to run the queued pieces and the process deadlocks (issue 13:
`chunkattn-train --attention delta`, `bench/speed.py … variant_delta`). Matmuls never block on
the pool, and the doubling is as accurate as the triangular solve in float32.

`delta_rule_step` is the O(1)-per-token update for decoding, and `delta_rule_reference` the
token-by-token recurrence (a `lax.scan` of it) that the chunked form is tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _unit_lower_inverse(a: Array) -> Array:
    """(I + a)⁻¹ for strictly lower-triangular a [..., C, C], without a triangular solve.

    Recursive doubling: with X₁₁, X₂₂ the inverses of the two diagonal s×s blocks of a 2s×2s
    diagonal block and A₂₁ its lower-left block, that block's inverse is
    [[X₁₁, 0], [−X₂₂ A₂₁ X₁₁, X₂₂]]. Starting from the 1×1 blocks (all 1), log₂ C levels of
    batched s×s matmuls (float32 at HIGHEST precision) give the whole inverse; C is padded to a
    power of two with zeros, which leaves the leading C×C block of the inverse unchanged.
    """
    c = a.shape[-1]
    cp = 1 << (c - 1).bit_length()  # next power of two >= c
    batch = a.shape[:-2]
    if cp != c:
        a = jnp.pad(a, [(0, 0)] * len(batch) + [(0, cp - c), (0, cp - c)])
    hi = jax.lax.Precision.HIGHEST
    x = jnp.ones(batch + (cp, 1, 1), a.dtype)  # (..., m, s, s): inverses of the diagonal blocks
    s = 1
    while s < cp:
        m = cp // (2 * s)
        lower_left = a.reshape(batch + (m, 2, s, m, 2, s))[..., :, 1, :, :, 0, :]
        a21 = jnp.moveaxis(jnp.diagonal(lower_left, axis1=-4, axis2=-2), -1, -3)  # (..., m, s, s)
        xr = x.reshape(batch + (m, 2, s, s))
        x11, x22 = xr[..., 0, :, :], xr[..., 1, :, :]
        x21 = -jnp.matmul(x22, jnp.matmul(a21, x11, precision=hi), precision=hi)
        top = jnp.concatenate([x11, jnp.zeros_like(x11)], axis=-1)
        x = jnp.concatenate([top, jnp.concatenate([x21, x22], axis=-1)], axis=-2)
        s *= 2
    return x.reshape(batch + (cp, cp))[..., :c, :c]


def _check_log_decay(log_decay: Array, shape: tuple[int, ...], layout: str) -> None:
    if log_decay.shape != shape:
        raise ValueError(f"log_decay must be {layout} = {shape}, got {log_decay.shape}")
    if isinstance(log_decay, jax.core.Tracer) or log_decay.size == 0:
        return  # traced values cannot be checked here: positive ones would grow the state
    top = float(jnp.max(log_decay))
    if not top <= 0.0:  # NaN fails too
        raise ValueError(
            f"log_decay must be <= 0 (decay α = exp(log_decay) <= 1), got a maximum of {top} "
            f"in log_decay.shape={log_decay.shape}"
        )


def _check_state(state: Array, shape: tuple[int, ...], name: str) -> None:
    if state.shape != shape:
        raise ValueError(f"{name} must be [B, N, Hk, Hv] = {shape}, got {state.shape}")


def _check(q, k, v, beta, log_decay, initial_state, chunk_size) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, N, Hk], got q.shape={q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k must be [B, T, N, Hk] = q.shape={q.shape}, got k.shape={k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, N, Hv] matching q.shape={q.shape}, got {v.shape}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B, T, N] = {q.shape[:3]}, got {beta.shape}")
    if log_decay is not None:
        _check_log_decay(log_decay, q.shape[:3], "[B, T, N]")
    if initial_state is not None:
        b, _, n, hk = q.shape
        _check_state(initial_state, (b, n, hk, v.shape[-1]), "initial_state")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def delta_rule(
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    *,
    log_decay: Array | None = None,
    chunk_size: int = 64,
    initial_state: Array | None = None,
    return_state: bool = False,
) -> Array | tuple[Array, Array]:
    """Causal delta-rule fast-weight attention, gated when `log_decay` is given.

    Args:
      q, k: [B, T, N, Hk]; v: [B, T, N, Hv]; beta: [B, T, N] (usually in (0, 1)).
      log_decay: [B, T, N], g_t <= 0, the decay α_t = exp(g_t) of the gated delta rule (None:
        α = 1, the plain delta rule). Concrete positive values raise ValueError; traced ones
        cannot be checked.
      chunk_size: tokens per chunk C (T need not be a multiple).
      initial_state: [B, N, Hk, Hv], the state S = Wᵀ before the first token (None: zeros), e.g.
        the state returned for the previous piece of the sequence (chunked prefill, decoding).
      return_state: also return the state after the last token.

    Returns:
      [B, T, N, Hv] in q's dtype (float32 accumulation); with return_state, (output, state)
      with the state [B, N, Hk, Hv] in float32.

    Example:
      >>> y = delta_rule(q, k, v, jax.nn.sigmoid(b), chunk_size=32)
      >>> y, s = delta_rule(q, k, v, beta, log_decay=-jax.nn.softplus(a), return_state=True)
      >>> y2, s = delta_rule(q2, k2, v2, beta2, log_decay=g2, initial_state=s, return_state=True)
    """
    _check(q, k, v, beta, log_decay, initial_state, chunk_size)
    b, t, n, hk = q.shape
    hv = v.shape[-1]
    s0 = (
        jnp.zeros((b, n, hk, hv), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )
    if t == 0:
        o = jnp.zeros((b, 0, n, hv), q.dtype)
        return (o, s0) if return_state else o
    c = min(chunk_size, t)
    nc = -(-t // c)
    pad = nc * c - t

    def prep(x):  # (B, T, N, ...) -> (nc, B, N, C, ...)
        # Padded tokens have k = 0, β = 0 and g = 0: they leave the state unchanged.
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((b, nc, c) + x.shape[2:])  # (B, nc, C, N, ...)
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)  # (nc, B, N, C, ...)

    gated = log_decay is not None
    xs = tuple(prep(x) for x in (q, k, v, beta) + ((log_decay,) if gated else ()))
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    causal = jnp.tril(jnp.ones((c, c), bool))

    def step(s, x):
        qc, kc, vc, bc = x[:4]  # (B,N,C,Hk) ×2, (B,N,C,Hv), (B,N,C)
        kk = jnp.einsum("bnih,bnjh->bnij", kc, kc)  # (B, N, C, C)
        qk = jnp.einsum("bnih,bnjh->bnij", qc, kc)  # (B, N, C, C)
        if gated:
            gam = jnp.cumsum(x[4], axis=-1)  # Γ: (B, N, C), <= 0 and decreasing
            diff = gam[..., :, None] - gam[..., None, :]  # Γ_i − Γ_j: (B, N, C, C)
            # Masked before the exp: above the diagonal Γ_i − Γ_j > 0 would overflow.
            decay = jnp.exp(jnp.where(causal, diff, 0.0))  # (B, N, C, C), in [0, 1] where used
            kk, qk = kk * decay, qk * decay
            kw = kc * jnp.exp(gam)[..., None]  # diag(e^Γ) K: (B, N, C, Hk)
            qs = qc * jnp.exp(gam)[..., None]  # diag(e^Γ) Q
        else:
            kw, qs = kc, qc
        a = jnp.where(strict, bc[..., :, None] * kk, 0.0)
        tmat = _unit_lower_inverse(a) * bc[..., None, :]  # (I + A)⁻¹ diag(β): (B, N, C, C)
        w = jnp.einsum("bnij,bnjh->bnih", tmat, kw)  # (B, N, C, Hk)
        u = jnp.einsum("bnij,bnjv->bniv", tmat, vc)  # (B, N, C, Hv)
        u = u - jnp.einsum("bnih,bnhv->bniv", w, s)
        qk = jnp.where(causal, qk, 0.0)
        o = jnp.einsum("bnih,bnhv->bniv", qs, s) + jnp.einsum("bnij,bnjv->bniv", qk, u)
        if gated:
            last = gam[..., -1:]  # Γ_C: (B, N, 1)
            kc = kc * jnp.exp(last - gam)[..., None]  # diag(exp(Γ_C − Γ)) K
            s = s * jnp.exp(last)[..., None]  # e^{Γ_C} S₀: (B, N, Hk, Hv)
        s = s + jnp.einsum("bnih,bniv->bnhv", kc, u)
        return s, o

    s, o = jax.lax.scan(jax.checkpoint(step), s0, xs)  # o: (nc, B, N, C, Hv)
    o = jnp.moveaxis(o, 0, 1)  # (B, nc, N, C, Hv)
    o = jnp.swapaxes(o, 2, 3).reshape(b, nc * c, n, hv)[:, :t].astype(q.dtype)
    return (o, s) if return_state else o


def delta_rule_step(
    state: Array, q: Array, k: Array, v: Array, beta: Array, log_decay: Array | None = None
) -> tuple[Array, Array]:
    """One token of the (gated) delta rule: O(1) work and memory, for decoding.

        S ← α S + β k (v − α Sᵀk)ᵀ   (= α (I − β k kᵀ) S + β k vᵀ),   y = Sᵀ q

    Args:
      state: [B, N, Hk, Hv], S = Wᵀ as `delta_rule(..., return_state=True)` returns it.
      q, k: [B, N, Hk]; v: [B, N, Hv]; beta: [B, N]; log_decay: [B, N] (<= 0) or None.

    Returns:
      (y [B, N, Hv] in q's dtype, the new state [B, N, Hk, Hv] in float32).

    Example:
      >>> _, s = delta_rule(q, k, v, beta, log_decay=g, return_state=True)  # prefill
      >>> y, s = delta_rule_step(s, q_new, k_new, v_new, beta_new, g_new)  # one more token
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [B, N, Hk] (one token), got q.shape={q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k must be [B, N, Hk] = q.shape={q.shape}, got k.shape={k.shape}")
    if v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be [B, N, Hv] matching q.shape={q.shape}, got {v.shape}")
    if beta.shape != q.shape[:2]:
        raise ValueError(f"beta must be [B, N] = {q.shape[:2]}, got {beta.shape}")
    _check_state(state, q.shape + v.shape[-1:], "state")
    f32 = jnp.float32
    s = state.astype(f32)
    qf, kf, vf, bf = (x.astype(f32) for x in (q, k, v, beta))
    if log_decay is not None:
        _check_log_decay(log_decay, q.shape[:2], "[B, N]")
        s = s * jnp.exp(log_decay.astype(f32))[..., None, None]  # α S
    err = vf - jnp.einsum("bnh,bnhv->bnv", kf, s)  # v − α Sᵀk: (B, N, Hv)
    s = s + bf[..., None, None] * jnp.einsum("bnh,bnv->bnhv", kf, err)  # (B, N, Hk, Hv)
    y = jnp.einsum("bnh,bnhv->bnv", qf, s)  # (B, N, Hv)
    return y.astype(q.dtype), s


def delta_rule_reference(
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    *,
    log_decay: Array | None = None,
    initial_state: Array | None = None,
    return_state: bool = False,
) -> Array | tuple[Array, Array]:
    """`delta_rule` one token at a time (a `lax.scan` of `delta_rule_step`): the test oracle.

    Same arguments and results as `delta_rule` (without chunk_size); O(T) sequential steps.
    """
    _check(q, k, v, beta, log_decay, initial_state, 1)
    b, t, n, hk = q.shape
    hv = v.shape[-1]
    s0 = (
        jnp.zeros((b, n, hk, hv), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )
    g = jnp.zeros(beta.shape, jnp.float32) if log_decay is None else log_decay

    def step(s, x):
        y, s = delta_rule_step(s, *x)
        return s, y

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v, beta, g))  # time first
    s, ys = jax.lax.scan(step, s0, xs)  # ys: (T, B, N, Hv)
    y = jnp.swapaxes(ys, 0, 1)
    return (y, s) if return_state else y
