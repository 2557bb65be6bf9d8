"""Shared benchmark machinery: the registry of implementations, memory and time measurement.

Every implementation is a function `fn(q, k, v, causal) -> out` on [B, T, N, H] arrays.
`available(backend)` lists those that exist on this backend (peers such as tokamax only when
importable). Memory comes from the compiled program (`memory_analysis().temp_size_in_bytes`)
and, on GPU, from the device's peak allocation; an out-of-memory is a result, not a crash.
"""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import chunkattn

Fn = Callable[[jax.Array, jax.Array, jax.Array, bool], jax.Array]


def dense_xla(q, k, v, causal):
    """Textbook attention: einsum, softmax, einsum, with the [T, S] scores in memory."""
    s = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    s = s * q.shape[-1] ** -0.5
    if causal:
        s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1).astype(v.dtype), v)


def _chunkattn(impl: str) -> Fn:
    return lambda q, k, v, causal: chunkattn.dot_product_attention(
        q, k, v, is_causal=causal, implementation=impl
    )


def _jax_nn(impl: str) -> Fn:
    return lambda q, k, v, causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation=impl
    )


def _rabe_staats(q, k, v, causal):
    import rabe_staats  # bench/ is on sys.path when scripts run from it

    return rabe_staats.attention(q, k, v, is_causal=causal)


def _tokamax(impl: str) -> Fn:
    def fn(q, k, v, causal):
        import tokamax

        return tokamax.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)

    return fn


def available(backend: str | None = None) -> dict[str, Fn]:
    """Implementations to compare on `backend`, by the names used in the results' impl column."""
    backend = backend or jax.default_backend()
    impls: dict[str, Fn] = {"chunkattn_chunked": _chunkattn("chunked")}
    if backend == "gpu":
        impls["chunkattn_pallas"] = _chunkattn("pallas")
    impls["dense_xla"] = dense_xla
    impls["jax_nn_xla"] = _jax_nn("xla")
    if backend == "gpu":
        impls["jax_nn_cudnn"] = _jax_nn("cudnn")
    impls["rabe_staats"] = _rabe_staats
    try:
        import tokamax  # noqa: F401

        for name in ("xla_chunked", "triton", "mosaic"):
            impls[f"tokamax_{name}"] = _tokamax(name)
    except ImportError:
        pass
    return impls


def inputs(key, batch, seq_len, heads, head_dim, dtype, n=1):
    """n independent sets of (q, k, v, dO), standard normal."""
    sets = []
    for kk in jax.random.split(key, n):
        sets.append(
            tuple(
                jax.random.normal(x, (batch, seq_len, heads, head_dim), dtype)
                for x in jax.random.split(kk, 4)
            )
        )
    return sets


def programs(fn: Fn, causal: bool):
    """(forward, forward+backward) jitted programs of (q, k, v, dO)."""
    f = lambda q, k, v: fn(q, k, v, causal)
    fwd = jax.jit(lambda q, k, v, do: f(q, k, v))
    fwdbwd = jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))
    return fwd, fwdbwd


def is_oom(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in ("resource_exhausted", "out of memory", "oom", "allocat"))


def status_of(e: BaseException) -> str:
    if isinstance(e, NotImplementedError):
        return "unsupported"
    return "OOM" if is_oom(e) else f"error: {type(e).__name__}"


def temp_bytes(program, *abstract_args) -> int:
    return program.lower(*abstract_args).compile().memory_analysis().temp_size_in_bytes


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def median_seconds(program, arg_sets, reps: int, warmup: int = 2) -> float:
    """Median wall time of `program` over `reps` runs, rotating input sets, after warm-up."""
    for i in range(warmup):
        jax.block_until_ready(program(*arg_sets[i % len(arg_sets)]))
    times = []
    for i in range(reps):
        args = arg_sets[i % len(arg_sets)]
        t = time.perf_counter()
        jax.block_until_ready(program(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def attention_flops(batch, heads, seq_len, head_dim, causal) -> float:
    """Forward FLOPs (DESIGN §5): 4·B·N·T·S·H, halved for causal; fwd+bwd is 3.5× this."""
    return 4.0 * batch * heads * seq_len * seq_len * head_dim / (2.0 if causal else 1.0)


def environment() -> dict[str, str]:
    return {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(),
    }
