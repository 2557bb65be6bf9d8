"""`attention_fn` for `flax.linen.MultiHeadDotProductAttention` and `flax.nnx.MultiHeadAttention`.

Flax calls `attention_fn(query, key, value, **kwargs)` with [batch..., T, N, H] arrays. linen
passes only the keyword arguments the function declares (mask, dropout_rng, dropout_rate,
broadcast_dropout, deterministic, dtype, precision, force_fp32_for_softmax, module); nnx passes
all of mask, dropout_rng, dropout_rate, broadcast_dropout, deterministic, dtype, precision,
module and is_causal. This module declares every one of them and serves the call with
`chunkattn.dot_product_attention`, so Flax's dense [B, N, T, S] attention weights are never
formed. What that makes impossible (sowing the attention weights through `module`) raises
NotImplementedError.

Differences from Flax's default, by design: dropout draws its mask from chunkattn's position
hash (reproducible, identical in the backward pass) rather than `jax.random.bernoulli`, and a
query row whose mask allows no key returns 0 (Flax's softmax returns the mean of the values).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from chunkattn.api import dot_product_attention

Array = jax.Array


def _flatten_batch(x: Array | None, batch_shape: tuple[int, ...], keep: int) -> Array | None:
    """[batch..., rest(keep dims)] -> [prod(batch), rest]; size-1 batch dims stay size 1."""
    if x is None:
        return None
    lead = x.shape[: x.ndim - keep]
    if all(d == 1 for d in lead):
        return x.reshape((1, *x.shape[x.ndim - keep :]))
    x = jnp.broadcast_to(x, (*batch_shape, *x.shape[x.ndim - keep :]))
    return x.reshape((math.prod(batch_shape), *x.shape[len(batch_shape) :]))


def _attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    is_causal: bool = False,
    force_fp32_for_softmax: bool = False,
    *,
    options: dict[str, Any],
) -> Array:
    del force_fp32_for_softmax  # scores and softmax are always float32 here
    if module is not None:
        raise NotImplementedError(
            "chunkattn.nn.attention_fn cannot sow attention weights (module=...): memory-"
            "efficient attention never forms the [T, S] weights. Use Flax's default attention "
            "for the calls that need them."
        )
    if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(
            "query, key and value must be [batch..., length, heads, depth] of one rank, got "
            f"query.shape={query.shape}, key.shape={key.shape}, value.shape={value.shape}"
        )
    if dtype is not None:
        query, key, value = (x.astype(dtype) for x in (query, key, value))
    else:
        common = jnp.result_type(query, key, value)
        query, key, value = (x.astype(common) for x in (query, key, value))
    batch_shape = query.shape[:-3]
    if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
        raise ValueError(
            f"query, key and value must share batch dims, got query.shape={query.shape}, "
            f"key.shape={key.shape}, value.shape={value.shape}"
        )
    q, k, v = (x.reshape((-1, *x.shape[-3:])) for x in (query, key, value))  # (B, T, N, H)
    for name, x in (("mask", mask), ("bias", bias)):
        if x is not None and x.ndim > len(batch_shape) + 3:
            raise ValueError(
                f"{name} must be broadcastable to [batch..., heads, q_length, kv_length]="
                f"{(*batch_shape, q.shape[2], q.shape[1], k.shape[1])}, got {name}.shape={x.shape}"
            )
    if mask is not None:
        mask = mask.astype(bool)
        mask = _flatten_batch(mask, batch_shape, min(3, mask.ndim)) if mask.ndim > 3 else mask
    if bias is not None and bias.ndim > 3:
        bias = _flatten_batch(bias, batch_shape, 3)
    use_dropout = dropout_rate > 0.0 and not deterministic
    out = dot_product_attention(
        q,
        k,
        v,
        bias,
        mask,
        is_causal=is_causal or options.pop("is_causal", False),
        dropout_rate=dropout_rate if use_dropout else 0.0,
        dropout_rng=dropout_rng if use_dropout else None,
        broadcast_dropout=broadcast_dropout,
        precision=precision,
        **options,
    )
    return out.reshape((*batch_shape, *out.shape[1:]))


def make_attention_fn(**options: Any) -> Callable[..., Array]:
    """A Flax `attention_fn` with `chunkattn.dot_product_attention` options baked in.

    Options are any keyword arguments of `chunkattn.dot_product_attention` that Flax does not
    pass itself: `is_causal`, `local_window_size`, `segment_ids`, `query_seq_lengths`,
    `key_value_seq_lengths`, `mask_fn`, `score_fn`, `logits_soft_cap`, `implementation`,
    `config`... so masks that should never be materialised are computed per chunk.

    Example:
        >>> layer = nnx.MultiHeadAttention(
        ...     num_heads=8, in_features=512, decode=False, rngs=nnx.Rngs(0),
        ...     attention_fn=chunkattn.nn.make_attention_fn(is_causal=True))
    """
    reserved = {
        "mask",
        "bias",
        "dropout_rng",
        "dropout_rate",
        "broadcast_dropout",
        "precision",
        "return_lse",
    }
    bad = sorted(reserved & set(options))
    if bad:
        raise ValueError(f"make_attention_fn: {bad} come from Flax at call time, not as options")

    def attention_fn(
        query: Array,
        key: Array,
        value: Array,
        bias: Array | None = None,
        mask: Array | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: Any = None,
        is_causal: bool = False,
        force_fp32_for_softmax: bool = False,
    ) -> Array:
        return _attention(
            query,
            key,
            value,
            bias,
            mask,
            broadcast_dropout,
            dropout_rng,
            dropout_rate,
            deterministic,
            dtype,
            precision,
            module,
            is_causal,
            force_fp32_for_softmax,
            options=dict(options),
        )

    attention_fn.__doc__ = "Memory-efficient drop-in for Flax's dot_product_attention" + (
        f", with {sorted(options)} baked in." if options else "."
    )
    return attention_fn


attention_fn = make_attention_fn()
attention_fn.__doc__ = """Memory-efficient exact drop-in for Flax's `dot_product_attention`.

Pass it as `attention_fn=chunkattn.nn.attention_fn` to `flax.linen.MultiHeadDotProductAttention`
or `flax.nnx.MultiHeadAttention`: same outputs and parameter gradients as Flax's default (rows
that see some key), with masks of any broadcast shape, dropout, dtype and precision.
"""
