"""`attention_fn` for `flax.linen.MultiHeadDotProductAttention` and `flax.nnx.MultiHeadAttention`.

Flax calls `attention_fn(query, key, value, **kwargs)` with [batch..., T, N, H] arrays. linen
passes only the keyword arguments the function declares (mask, dropout_rng, dropout_rate,
broadcast_dropout, deterministic, dtype, precision, force_fp32_for_softmax, module); nnx passes
all of mask, dropout_rng, dropout_rate, broadcast_dropout, deterministic, dtype, precision,
module and is_causal. This module declares every one of them and serves the call with
`chunkattn.dot_product_attention`, so Flax's dense [B, N, T, S] attention weights are never
formed, with two exceptions that follow Flax exactly:

- Sowing (`module` given: linen's `sow_weights=True`, nnx's `sow_weights=True`): the weights
  are computed densely, O(B·N·T·S) memory, by `chunkattn.reference_attention` with the same
  masks and options, and sown as Flax sows them (linen: collection "intermediates", nnx:
  `nnx.Intermediate`; name "attention_weights"; shape [batch..., N, T, S]; before dropout).
  The output still comes from the chosen chunkattn path.
- Complex inputs are served by Flax's own dense function, so the numbers are Flax's: nnx's
  `nnx.dot_product_attention` for a call from nnx (which passes `is_causal`, or sows into an
  nnx module), linen's `linen.dot_product_attention` otherwise.

`is_causal` given at call time (nnx) and to `make_attention_fn` combine with OR: either one
makes the attention causal.

Differences from Flax's default, by design: dropout draws its mask from chunkattn's position
hash (reproducible, identical in the backward pass) rather than `jax.random.bernoulli`, and a
query row whose mask allows no key returns 0 (Flax's softmax returns the mean of the values);
its sown weights are 0 too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp
from flax import nnx

from chunkattn.api import dot_product_attention
from chunkattn.reference import reference_attention

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


def _flax_complex(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None,
    mask: Array | None,
    broadcast_dropout: bool,
    dropout_rng: Array | None,
    dropout_rate: float,
    deterministic: bool,
    dtype: Any,
    precision: Any,
    module: Any,
    is_causal: bool,
    force_fp32_for_softmax: bool,
    nnx_call: bool,
    options: dict[str, Any],
) -> Array:
    """Complex inputs: Flax's own dense attention, nnx's or linen's, as the caller's default."""
    unsupported = sorted(set(options) - {"implementation", "config"})
    if unsupported:
        raise NotImplementedError(
            f"complex inputs with make_attention_fn options {unsupported}: complex attention "
            "is Flax's dense function, which has none of them"
        )
    if nnx_call:
        return nnx.dot_product_attention(
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
            is_causal=is_causal,
        )
    if is_causal:  # linen's function has no is_causal: the same top-left causal mask
        causal = jnp.tril(jnp.ones((query.shape[-3], key.shape[-3]), bool))  # (T, S)
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    return linen.dot_product_attention(
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
        force_fp32_for_softmax,
    )


def _sow_weights(
    module: Any,
    q: Array,
    k: Array,
    bias: Array | None,
    mask: Array | None,
    batch_shape: tuple[int, ...],
    weights_dtype: Any,
    precision: Any,
    options: dict[str, Any],
) -> None:
    """Dense attention weights [batch..., N, T, S], sown where Flax's default sows them.

    The weights are the attention of the queries over one-hot values (value j = e_j), so every
    mask and option means exactly what it means in `dot_product_attention`. O(B·N·T·S) memory.
    """
    if isinstance(module, nnx.Module):
        collection: Any = nnx.Intermediate
    elif isinstance(module, linen.Module):
        collection = "intermediates"
    else:
        raise ValueError(
            "module must be the flax.linen or flax.nnx Module to sow the attention weights "
            f"into, got module of type {type(module).__name__}"
        )
    batch, seq_k, kv_heads = k.shape[:3]
    one_hot = jnp.broadcast_to(
        jnp.eye(seq_k, dtype=q.dtype)[None, :, None, :], (batch, seq_k, kv_heads, seq_k)
    )  # (B, S, K, S): value j is e_j
    weights = reference_attention(q, k, one_hot, bias, mask, precision=precision, **options)
    weights = jnp.swapaxes(weights, 1, 2).astype(weights_dtype)  # (B, N, T, S)
    module.sow(collection, "attention_weights", weights.reshape((*batch_shape, *weights.shape[1:])))


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
    is_causal: bool | None = None,
    force_fp32_for_softmax: bool = False,
    *,
    options: dict[str, Any],
    baked_causal: bool,
) -> Array:
    # nnx passes is_causal on every call (linen never does): that tells whose default to follow
    nnx_call = is_causal is not None or isinstance(module, nnx.Module)
    is_causal = bool(is_causal) or baked_causal
    if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(
            "query, key and value must be [batch..., length, heads, depth] of one rank, got "
            f"query.shape={query.shape}, key.shape={key.shape}, value.shape={value.shape}"
        )
    common = jnp.dtype(dtype) if dtype is not None else jnp.result_type(query, key, value)
    if jnp.issubdtype(common, jnp.complexfloating):
        return _flax_complex(
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
            nnx_call,
            options,
        )
    # scores and softmax are always float32 here, whatever force_fp32_for_softmax says
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
    if module is not None:  # linen sows in float32 when asked to force the softmax there
        fp32 = force_fp32_for_softmax and not nnx_call and common != jnp.float32
        weights_dtype = jnp.float32 if fp32 else common
        options_all = dict(options, is_causal=is_causal)
        _sow_weights(module, q, k, bias, mask, batch_shape, weights_dtype, precision, options_all)
    use_dropout = dropout_rate > 0.0 and not deterministic
    out = dot_product_attention(
        q,
        k,
        v,
        bias,
        mask,
        is_causal=is_causal,
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
    `key_value_seq_lengths`, `mask_fn`, `score_fn`, `logits_soft_cap`, `sinks`,
    `implementation`, `config`... so masks that should never be materialised are computed per
    chunk. A baked-in `is_causal=True` and the `is_causal` an nnx module passes at call time
    combine with OR: either one makes the attention causal (`is_causal=False` at call time
    cannot undo it).

    `sinks` [N] (attention sinks, one logit per query head) may be a traced value: built inside
    a module's call from a parameter it owns, the function carries that parameter's gradient
    (sown weights then leave each row's sink share out, so they sum to less than 1).

    Example:
        >>> layer = nnx.MultiHeadAttention(
        ...     num_heads=8, in_features=512, decode=False, rngs=nnx.Rngs(0),
        ...     attention_fn=chunkattn.nn.make_attention_fn(is_causal=True))
        >>> y = layer(x)                  # causal
        >>> y = layer(x, is_causal=True)  # causal too: nnx's own flag joins with OR
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
    baked_causal = options.pop("is_causal", False)
    if not isinstance(baked_causal, bool):
        raise ValueError(f"make_attention_fn: is_causal must be a bool, got {baked_causal!r}")

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
        is_causal: bool | None = None,
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
            baked_causal=baked_causal,
        )

    baked = sorted([*options, *(["is_causal"] if baked_causal else [])])
    attention_fn.__doc__ = "Memory-efficient drop-in for Flax's dot_product_attention" + (
        f", with {baked} baked in." if baked else "."
    )
    return attention_fn


attention_fn = make_attention_fn()
attention_fn.__doc__ = """Memory-efficient exact drop-in for Flax's `dot_product_attention`.

Pass it as `attention_fn=chunkattn.nn.attention_fn` to `flax.linen.MultiHeadDotProductAttention`
or `flax.nnx.MultiHeadAttention`: same outputs and parameter gradients as Flax's default (rows
that see some key), with masks of any broadcast shape, dropout, dtype and precision. Complex
inputs go to Flax's own dense function; `sow_weights=True` sows dense weights (O(T·S) memory)
as Flax does, while the output still comes from chunkattn.
"""
