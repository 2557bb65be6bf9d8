"""Shared benchmark machinery: the registry of implementations, memory and time measurement.

Every implementation is a function `fn(q, k, v, causal) -> out` on [B, T, N, H] arrays.
`available(backend)` lists those that exist on this backend (peers such as tokamax only when
importable), and the linear-time variants of `chunkattn.variants` (causal only) as
`variant_*`. Memory comes from the compiled program (`memory_analysis().temp_size_in_bytes`)
and, on GPU, from the device's peak allocation; an out-of-memory is a result, not a crash.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import chunkattn
from chunkattn.variants import caterpillar, delta_rule, dpfp, linear_attention

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


# The linear-time variants (chunkattn.variants) take extra inputs that plain attention lacks.
# The adapters derive them from q and k, cheaply and deterministically, so every implementation
# still sees the same (q, k, v) and the memory/time measured is that of the variant itself.
CATERPILLAR_HEIGHT = 4  # CH: the GPT layer's default (chunkattn.variants.layers)
CATERPILLAR_LENGTH = 16  # CL: the GPT layer's default, so bench and training measure one model
VARIANT_CHUNK = 64  # chunk size of linear_attention and delta_rule (their default)


def _causal_only(name: str, causal: bool) -> None:
    if not causal:
        raise NotImplementedError(f"{name} is causal only (a recurrence over the sequence)")


def variant_linear(q, k, v, causal):
    """Causal linear attention, elu(x)+1 features, normalized (`linear_attention` defaults)."""
    _causal_only("variant_linear", causal)
    return linear_attention(q, k, v, chunk_size=VARIANT_CHUNK)


def variant_delta(q, k, v, causal):
    """Delta-rule fast weights on DPFP(ν=1) features of q and k, β = sigmoid(mean_h k).

    ν=1 doubles the key dimension (2·H), as the GPT layer's default does; β depends on the input
    (like the layer's learned β) so the backward pass includes its gradient.
    """
    _causal_only("variant_delta", causal)
    beta = jax.nn.sigmoid(jnp.mean(k.astype(jnp.float32), axis=-1))  # (B, T, N)
    return delta_rule(dpfp(q, 1), dpfp(k, 1), v, beta, chunk_size=VARIANT_CHUNK)


def variant_caterpillar(q, k, v, causal):
    """Caterpillar with CH=4, CL=16 (the GPT layer's defaults) and no initial state.

    Gates G = sigmoid(q[..., :CH]) clipped as the layer does, G / max(1, Σ_heads G), so the
    recurrence stays contractive; H must be at least CH.
    """
    _causal_only("variant_caterpillar", causal)
    ch = CATERPILLAR_HEIGHT
    if q.shape[-1] < ch:
        raise ValueError(f"variant_caterpillar needs head dim >= CH={ch}, got q.shape={q.shape}")
    g = jax.nn.sigmoid(q[..., :ch].astype(jnp.float32))  # (B, T, N, CH)
    g = g / jnp.maximum(1.0, jnp.sum(g, axis=2, keepdims=True))
    return caterpillar(q, k, v, g, length=CATERPILLAR_LENGTH)


VARIANTS: dict[str, Fn] = {
    "variant_linear": variant_linear,
    "variant_delta": variant_delta,
    "variant_caterpillar": variant_caterpillar,
}


def available(backend: str | None = None) -> dict[str, Fn]:
    """Implementations to compare on `backend`, by the names used in the results' impl column.

    The softmax implementations come first, then the linear-time variants (causal only: they
    report "unsupported" for full attention).
    """
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
    impls.update(VARIANTS)
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


def tag_arg(text: str) -> str:
    """argparse type of --tag: it becomes part of a file name, so letters, digits, - and _ only."""
    if text and not text.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"letters, digits, '-' or '_' only, got {text!r}")
    return text


def result_stem(bench: str, tag: str, env: dict[str, str]) -> str:
    """`<bench>_[<tag>_]<backend>_<date>`: a tag keeps a focused run beside the main one."""
    return "_".join(x for x in (bench, tag, env["backend"], env["date"]) if x)
