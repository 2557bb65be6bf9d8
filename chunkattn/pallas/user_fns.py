"""Whether a user's `mask_fn` / `score_fn` can be traced into a Pallas kernel body.

Shared by the GPU kernels (`dispatch.py`, Triton lowering), the Mosaic GPU forward
(`mosaic.py`) and the TPU kernels (`chunkattn/tpu_flash.py`, Mosaic TPU lowering). A kernel
cannot capture arrays (a function closing over a table or a traced value, whose arrays api.py
would make explicit `score_params`, runs in the chunked path), and each lowering implements a
fixed set of primitives; both are checked on the function's jaxpr at the kernel's block shapes,
before any kernel is traced, so that `implementation=None` can fall back. Where a lowering takes
a primitive for some operand dtypes only (Mosaic GPU), the check is a predicate on each
equation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

Array = jax.Array


def equations(jaxpr) -> Iterator[Any]:
    """Every equation of a jaxpr, including those of its sub-jaxprs (jit, custom_jvp, cond)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def primitives(jaxpr) -> set[str]:
    """Every primitive in a jaxpr, including those of its sub-jaxprs (jit, custom_jvp, cond)."""
    return {str(eqn.primitive) for eqn in equations(jaxpr)}


def used_arguments(fn: Callable[..., Array], *example: Any) -> tuple[bool, ...]:
    """Which arguments `fn(*example)`'s result depends on (a backward walk over its jaxpr; an
    equation with a needed output needs all its inputs). A kernel can then leave out what a
    user function never reads (Mosaic GPU cannot lay out an array nothing uses)."""
    jaxpr = jax.make_jaxpr(fn)(*example).jaxpr
    needed = {v for v in jaxpr.outvars if isinstance(v, jax_core.Var)}
    for eqn in reversed(jaxpr.eqns):
        if any(v in needed for v in eqn.outvars):
            needed |= {v for v in eqn.invars if isinstance(v, jax_core.Var)}
    return tuple(v in needed for v in jaxpr.invars)


def describe(eqn) -> str:
    """An equation as a message names it: its primitive and its operands' dtypes."""
    dtypes = ", ".join(str(getattr(v.aval, "dtype", "?")) for v in eqn.invars)
    return f"{eqn.primitive} ({dtypes})"


def check_user_fn(
    name: str,
    fn: Callable[..., Array],
    *example: Any,
    lowerable: set[str] | Callable[[Any], bool] | None,
    kernels: str = "pallas",
) -> None:
    """Raise NotImplementedError unless `fn` can be traced into a kernel body.

    `lowerable`: the primitive names the kernels' lowering implements (None: unknown, assume
    all), or a predicate on each equation where the operands' dtypes matter too (Mosaic GPU:
    `mosaic.lowerable`; the message then names the dtypes); `kernels` names the kernels in
    the message.
    """
    closed = jax.make_jaxpr(fn)(*example)
    if closed.consts:
        shapes = ", ".join(str(getattr(c, "shape", ())) for c in closed.consts)
        raise NotImplementedError(
            f"the {kernels} kernels do not implement a {name} that closes over arrays (shapes "
            f"{shapes}); pass implementation='chunked' or compute them from the indices"
        )
    if callable(lowerable):
        missing = sorted({describe(e) for e in equations(closed.jaxpr) if not lowerable(e)})
    elif lowerable is not None:
        missing = sorted(primitives(closed.jaxpr) - lowerable)
    if lowerable is not None:
        if missing:
            raise NotImplementedError(
                f"the {kernels} kernels cannot lower the {name} operations {', '.join(missing)}"
            )


def check_user_fns(
    mask_fn: Callable[..., Array] | None,
    score_fn: Callable[..., Array] | None,
    where: tuple[Any, Any, Any, Any],
    score: Any,
    *,
    lowerable: set[str] | Callable[[Any], bool] | None,
    kernels: str = "pallas",
    derivative: bool = True,
) -> None:
    """Check `mask_fn(*where)` and `score_fn(score, *where)` with its forward-mode derivative
    (which the backward kernels trace too; `derivative=False` for kernels that trace only the
    forward); `where` and `score` are the shapes (jax.ShapeDtypeStruct) the kernels pass:
    (batch, head, q_pos, k_pos) and the score block."""
    if mask_fn is not None:
        check_user_fn("mask_fn", mask_fn, *where, lowerable=lowerable, kernels=kernels)
    if score_fn is not None:

        def with_derivative(s, *idx):
            f = lambda x: jnp.broadcast_to(score_fn(x, *idx), x.shape).astype(jnp.float32)
            return jax.jvp(f, (s,), (jnp.ones_like(s),)) if derivative else f(s)

        check_user_fn(
            "score_fn", with_derivative, score, *where, lowerable=lowerable, kernels=kernels
        )
