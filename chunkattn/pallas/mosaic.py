"""The Hopper forward kernel (Pallas Mosaic GPU: wgmma, TMA, warp specialisation), EXPERIMENTAL.

`implementation="pallas_mosaic"` runs it; `implementation=None` never does until the GPU test
suite has passed on an H100/H200 (issue 21). Its backward is the Triton kernels' (`backward.py`)
through the same custom_vjp: the kernel returns what they need, the output and the natural-log
lse in the Triton forward's conventions (`dispatch.flash_attention`). The Mosaic GPU backward
(`mosaic_backward.py`, experimental) replaces them with
`MosaicConfig(backward=MosaicBackwardConfig())`.

Structure (FlashAttention-3, arXiv 2407.08608 §3.1; jax's ops/gpu/attention_mgpu.py): one
program per (head, tile of 2·block_q query rows, batch) with three warpgroups. The memory
warpgroup streams the key blocks [lo, hi) of the tile through a ring of `num_stages` K/V
buffers (TMA, one "ready" barrier per buffer, one "free" barrier that both compute warpgroups
arrive at); the two compute warpgroups own block_q rows each and take turns on the tensor cores
(the schedule barrier: one's softmax runs while the other's matrix products do). Scores are in
the log2 domain (s₂ = s·log₂e: one exp2 per weight).

Masks are per-row key ranges: row r may see keys [kstart_r, kend_r) (`key_ranges`: causal,
window, q_offset, both lengths, padding), and with segment ids also only equal ids (compared
in the kernel). `block_schedule` turns the ranges into the tile's key blocks [lo, hi)
(intersected with `kernel_common.segment_ranges` for packed sequences) and, per compute
warpgroup, the blocks [flo, fhi) that every one of its rows sees whole, which skip the mask
arithmetic (`kernel_common.three_phase`); with a mask_fn no block is known whole, while the
ranges still skip blocks. Sinks start each row's running max and sum.

A user's mask_fn(batch, head, q_pos, k_pos) and score_fn(s, batch, head, q_pos, k_pos) are
traced into the loop's body (`block_positions`, `block_scores`, `user_mask`): each gets int32
[64, block_k] arrays (positions in the WGMMA layout, batch and head splats) at global positions
(q_pos = row + q_offset, the batch's q_offset in the schedule's column 6), as the Triton and
TPU kernels give them; the
score order is every path's, scale·q·kᵀ → soft cap → score_fn → masks. With a score_fn the
scores stay in the natural domain (`Plan.log2_domain`: a finite score near float32's limit
must not overflow when scaled by log₂e), so exp replaces exp2. What a user function may use is
`USER_FN_OPERATIONS`, the elementwise primitives Mosaic GPU lowers on those arrays, by operand
dtype; `check_user_fns` declines the rest, and closures over arrays, before any tracing.

The parts are functions checkable on the CPU against the float32 reference: `key_ranges`,
`block_schedule`, `score_block`, `block_scores`, `mask_block`, `softmax_step`, `online_block`
(one block of the loop, given its matrix product), `finish`, and `emulate`, the kernel's loops
in plain jnp. The kernel itself runs in the Mosaic GPU interpreter from jax 0.11
(`mosaic_compat`).

Serves bf16/f16 with head dims 64, 128 and 256 (q/k and v each), GQA, causal, window, q_offset,
lengths, segment ids, soft cap, sinks, mask_fn and score_fn, and the lse. A dense bias or mask,
dropout, float32/float64, other head dims, and a mask_fn / score_fn that closes over arrays or
uses an operation outside `USER_FN_OPERATIONS` raise NotImplementedError naming the feature
(the Mosaic backward, opt-in, declines any mask_fn / score_fn: dispatch.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from chunkattn.pallas import user_fns
from chunkattn.pallas.config import PallasConfig
from chunkattn.pallas.kernel_common import LN2, LOG2E, segment_ranges, three_phase

Array = jax.Array

HEAD_DIMS = (64, 128, 256)
SMEM_LIMIT = 232_448  # bytes per block on sm_90a (shared_memory_per_block_optin)
COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Blocks of the Mosaic GPU forward kernel (`implementation="pallas_mosaic"`).

    block_q: query rows per compute warpgroup (wgmma's M is 64 per warpgroup); a program holds
      two, a tile of 2·block_q rows.
    block_k: key rows per K/V buffer; None: 128 when both head dims are ≤ 128, else 64 (the
      ring's shared memory at H = 256: `smem_bytes`).
    num_stages: K/V buffers in the ring (TMA runs that many blocks ahead).
    backward: the backward the Mosaic forward is paired with: a PallasConfig, the Triton
      kernels with its blocks (the default), or a `mosaic_backward.MosaicBackwardConfig`, the
      Mosaic GPU backward kernels (experimental, issue 21: never run on a GPU yet).
    """

    block_q: int = 64
    block_k: int | None = None
    num_stages: int = 2
    backward: PallasConfig = PallasConfig()

    def __post_init__(self):
        if self.block_q != 64:
            raise ValueError(f"MosaicConfig.block_q must be 64, got {self.block_q!r}")
        if self.block_k is not None and self.block_k not in (64, 128, 256):
            raise ValueError(f"MosaicConfig.block_k must be 64, 128 or 256, got {self.block_k!r}")
        if not (isinstance(self.num_stages, int) and 2 <= self.num_stages <= 4):
            raise ValueError(f"MosaicConfig.num_stages must be in 2..4, got {self.num_stages!r}")
        from chunkattn.pallas.mosaic_backward import MosaicBackwardConfig

        if not isinstance(self.backward, PallasConfig | MosaicBackwardConfig):
            raise ValueError(
                "MosaicConfig.backward must be a PallasConfig or a MosaicBackwardConfig, got "
                f"{type(self.backward).__name__}"
            )

    def resolve_block_k(self, head_dims: tuple[int, int]) -> int:
        if self.block_k is not None:
            return self.block_k
        return 128 if max(head_dims) <= 128 else 64


class Plan(NamedTuple):
    """Everything static about one kernel launch (hashable)."""

    scale: float
    soft_cap: float | None
    has_segments: bool
    has_sinks: bool
    groups: int  # query heads per kv head
    head_dims: tuple[int, int]  # (H, Hv)
    block_q: int
    block_k: int
    num_stages: int
    interpret: bool
    backward: Any = None  # a `mosaic_backward.BwdPlan`: the Mosaic backward, else Triton's
    mask_fn: Callable[..., Array] | None = None  # (batch, head, q_pos, k_pos) -> bool
    score_fn: Callable[..., Array] | None = None  # (score, batch, head, q_pos, k_pos) -> score

    @property
    def log2_domain(self) -> bool:
        """Scores in the log2 domain (one exp2 per weight) unless a score_fn may return scores
        that overflow once scaled by log₂e; with one they stay natural (`kernel_common.Static`)."""
        return self.score_fn is None

    @property
    def has_positions(self) -> bool:
        """A user function needs the block's (batch, head, q_pos, k_pos) (`block_positions`)."""
        return self.mask_fn is not None or self.score_fn is not None


def smem_bytes(
    head_dims: tuple[int, int],
    itemsize: int,
    block_q: int,
    block_k: int,
    num_stages: int,
    interpret: bool = False,
) -> int:
    """The kernel's shared memory (its buffers; barriers and alignment are a few hundred B)."""
    h, hv = head_dims
    total = COMPUTE_WGS * block_q * h * itemsize  # Q (and O when Hv = H)
    if hv != h:
        total += COMPUTE_WGS * block_q * hv * itemsize
    total += num_stages * block_k * (h + hv) * itemsize  # the K/V ring
    total += COMPUTE_WGS * block_q * 4  # lse
    if interpret:
        total += COMPUTE_WGS * block_q * block_k * itemsize  # P (interpreter only)
    return total


def unsupported_features(args: Any, opts: Any) -> list[str]:
    """Names of what the request asks that this kernel does not implement (empty: it serves it)."""
    h, hv = args.query.shape[-1], args.value.shape[-1]
    found = [
        ("a dense bias", args.bias is not None),
        ("a dense mask", args.mask is not None),
        ("dropout", opts.dropout_rate > 0),
        (
            f"{jnp.dtype(args.query.dtype).name} inputs (it takes bfloat16 or float16)",
            args.query.dtype not in (jnp.bfloat16, jnp.float16),
        ),
        (
            f"head dims {h}/{hv} (it takes {', '.join(map(str, HEAD_DIMS))})",
            h not in HEAD_DIMS or hv not in HEAD_DIMS,
        ),
    ]
    return [name for name, present in found if present]


# What a mask_fn / score_fn may use inside the kernel: the elementwise primitives whose Mosaic
# GPU lowering takes [64, block_k] arrays in the WGMMA layout (and splats), by the kinds of
# operand each takes: "f" float32, "i" int32, "b" bool. Found by lowering one kernel per
# (primitive, kind) with jax 0.10.2 (Lane semantics) and 0.11.2 (Warpgroup semantics, its
# default) and compiling them all for sm_90a on both (bench/NOTES.md v16). Left out as they fail
# on one or both: pow, floor, ceil, expm1, log1p (no rule), erf and atan2 (0.11: no layout
# rule), rem of floats, not of bools (0.11), conversion to bool. `lowerable` also requires
# the installed jax's rule (0.10 has no sqrt), a conversion to float32 or int32, and a
# broadcast of a scalar only. Reductions, slices, reshapes, iotas and loops are not
# elementwise, which the user functions must be.
_FLOAT_OPS = "exp exp2 log log2 sqrt rsqrt tanh logistic sin cos round"
_INT_OPS = "rem not shift_left shift_right_arithmetic shift_right_logical"
_ARITH_OPS = "add sub mul div max min neg abs sign square integer_pow clamp lt le gt ge"
_ANY_OPS = "eq ne select_n convert_element_type broadcast_in_dim"
USER_FN_OPERATIONS: dict[str, str] = {
    **dict.fromkeys(_FLOAT_OPS.split(), "f"),
    **dict.fromkeys(_INT_OPS.split(), "i"),
    **dict.fromkeys(_ARITH_OPS.split(), "fi"),
    **dict.fromkeys("and or xor".split(), "ib"),
    **dict.fromkeys(_ANY_OPS.split(), "fib"),
    "jit": "fib",  # a nested jax.jit: its body's equations are checked too
}
_KINDS = {jnp.dtype(jnp.float32): "f", jnp.dtype(jnp.int32): "i", jnp.dtype(jnp.bool_): "b"}


@functools.cache
def registered_primitives() -> frozenset[str] | None:
    """The primitives the installed jax's Mosaic GPU lowering has a rule for, in the lowering
    semantics plgpu kernels get by default (Lane on 0.10, Warpgroup from 0.11); None: unknown."""
    try:
        from jax._src.pallas.mosaic_gpu import core, lowering

        semantics = core.CompilerParams().lowering_semantics
        rules = lowering.mosaic_lowering_rules[(semantics, core.PrimitiveSemantics.Warpgroup)]
    except (ImportError, AttributeError, KeyError):  # pragma: no cover - private module moved
        return None
    return frozenset(str(p) for p in rules)


def lowerable(eqn) -> bool:
    """Whether the kernel can lower one equation of a user function (`USER_FN_OPERATIONS`)."""
    name = str(eqn.primitive)
    kinds = USER_FN_OPERATIONS.get(name)
    registered = registered_primitives()
    if kinds is None or (registered is not None and name not in registered):
        return False
    if name == "jit":
        return True
    if name == "broadcast_in_dim" and eqn.invars[0].aval.ndim != 0:
        return False
    if name == "convert_element_type" and _KINDS.get(eqn.params["new_dtype"]) not in ("f", "i"):
        return False
    return all(_KINDS.get(getattr(v.aval, "dtype", None), "?") in kinds for v in eqn.invars)


def check_user_fns(mask_fn, score_fn, block_q: int, block_k: int) -> None:
    """NotImplementedError unless mask_fn / score_fn can be traced into the kernel: no closure
    over arrays, only `lowerable` equations (`user_fns.check_user_fns`), at the shapes the
    kernel passes, int32 [bq, bk] positions (`block_positions`) and a float32 [bq, bk] block.
    Only the forward traces them: the Triton backward checks its own (dispatch.py)."""
    where = jax.ShapeDtypeStruct((block_q, block_k), jnp.int32)
    user_fns.check_user_fns(
        mask_fn,
        score_fn,
        (where,) * 4,
        jax.ShapeDtypeStruct((block_q, block_k), jnp.float32),
        lowerable=lowerable,
        kernels="pallas_mosaic",
        derivative=False,
    )


# ------------------------------------------------------------ the parts (checkable on the CPU)


def key_ranges(meta: Array, seq_q: int, seq_k: int) -> tuple[Array, Array]:
    """Per-row key ranges, int32 [B, seq_q] each: row r may attend keys [kstart_r, kend_r).

    `meta` is dispatch's int32 [B, 8] (`kernel_common.META`): q_len (col 1), kv_len (col 2) and
    the causal/window bounds rel_lo ≤ j − r ≤ rel_hi (cols 5, 6; saturated at ±2^30). Keys lie in
    [0, seq_k) and rows in [0, seq_q), so clipping the bounds to (−seq_q − 1, seq_k + 1) changes
    no comparison and keeps every sum far inside int32. Rows at or past q_len get [0, 0).
    """
    q_len, kv_len = meta[:, 1:2], meta[:, 2:3]  # (B, 1)
    rel_lo = jnp.maximum(meta[:, 5:6], -seq_q - 1)
    rel_hi = jnp.minimum(meta[:, 6:7], seq_k + 1)
    rows = jnp.arange(seq_q, dtype=jnp.int32)[None, :]
    kstart = jnp.clip(rows + rel_lo, 0, kv_len)
    kend = jnp.clip(rows + rel_hi + 1, kstart, kv_len)  # empty ([k, k)) when nothing allowed
    padding = rows >= q_len
    return jnp.where(padding, 0, kstart), jnp.where(padding, 0, kend)


def block_schedule(
    kstart: Array,
    kend: Array,
    block_q: int,
    block_k: int,
    seg_range: Array | None = None,
    none_whole: bool = False,
) -> Array:
    """int32 [B, tiles, 8]: per tile of 2·block_q rows, (lo, hi, flo₀, fhi₀, flo₁, fhi₁, 0, 0).

    [lo, hi): the key blocks holding any key a row of the tile may see (also within
    `seg_range`, the blocks whose segment ids can meet the tile's). [flo_w, fhi_w) ⊆ [lo, hi):
    the blocks every row of compute warpgroup w sees whole, kstart ≤ j·bk and (j+1)·bk ≤ kend
    for each of its rows, so they need no mask: none with segment ids, which ranges cannot
    describe, nor with `none_whole` (a mask_fn, which may drop any key). A tile whose rows see
    no key gets [0, 0).
    """
    batch, seq_q = kstart.shape
    tiles = seq_q // (COMPUTE_WGS * block_q)
    ks = kstart.reshape(batch, tiles, COMPUTE_WGS, block_q)
    ke = kend.reshape(batch, tiles, COMPUTE_WGS, block_q)
    nonempty = ke > ks
    seen = jnp.any(nonempty, axis=(2, 3))
    first = jnp.min(jnp.where(nonempty, ks, jnp.iinfo(jnp.int32).max), axis=(2, 3))
    last = jnp.max(jnp.where(nonempty, ke, 0), axis=(2, 3))
    lo = jnp.where(seen, first // block_k, 0)
    hi = jnp.where(seen, -(-last // block_k), 0)
    if seg_range is not None:
        lo, hi = jnp.maximum(lo, seg_range[..., 0]), jnp.minimum(hi, seg_range[..., 1])
    hi = jnp.maximum(hi, lo)
    lo3, hi3 = lo[..., None], hi[..., None]
    flo = -(-jnp.max(ks, axis=3) // block_k)  # (B, tiles, 2)
    fhi = jnp.min(ke, axis=3) // block_k
    if seg_range is not None or none_whole:
        flo = fhi = jnp.broadcast_to(lo3, flo.shape)
    flo = jnp.clip(flo, lo3, hi3)
    fhi = jnp.clip(fhi, flo, hi3)
    zero = jnp.zeros_like(lo3)
    cols = [lo3, hi3, flo[..., :1], fhi[..., :1], flo[..., 1:], fhi[..., 1:], zero, zero]
    return jnp.concatenate(cols, axis=-1).astype(jnp.int32)


def score_block(raw: Array, scale: float, soft_cap: float | None, unit: float = LOG2E) -> Array:
    """Scores in the log2 domain from raw = q·kᵀ (float32): s₂ = log₂e·s, where s = scale·raw,
    or with a soft cap s = cap·tanh(scale·raw/cap); `unit` = 1 gives s itself (natural domain).

    tanh is written with exp2 (tanh x = 1 − 2/(1 + e^{2x})): the kernel compiles with
    approx_math, whose tanh.approx has ~5e-4 absolute error (×cap in the score), while ex2.approx
    is within 2 ulp; the form is exact at ±inf and loses only ~1e-7·cap near 0.
    """
    if soft_cap is None:
        return raw * (scale * unit)
    e2x = jnp.exp2(raw * (2.0 * LOG2E * scale / soft_cap))
    return (soft_cap * unit) * (1.0 - 2.0 / (1.0 + e2x))


@functools.cache
def used_positions(plan: Plan, shape: tuple[int, int], masked: bool) -> tuple[bool, ...]:
    """Which of (batch, head, q_pos, k_pos) the user functions applied to a block read: the
    score_fn's always, the mask_fn's in masked blocks (`user_fns.used_arguments`)."""
    where = (jax.ShapeDtypeStruct(shape, jnp.int32),) * 4
    used = [False] * 4
    if plan.score_fn is not None:
        score = jax.ShapeDtypeStruct(shape, jnp.float32)
        used = user_fns.used_arguments(plan.score_fn, score, *where)[1:]
    if masked and plan.mask_fn is not None:
        by_mask = user_fns.used_arguments(plan.mask_fn, *where)
        used = [a or b for a, b in zip(used, by_mask, strict=True)]
    return tuple(used)


def applies_user_fns(plan: Plan, masked: bool) -> bool:
    """Whether a block calls a user function: a score_fn in every block, a mask_fn in masked
    ones (a block every row sees whole has no mask to apply)."""
    return plan.score_fn is not None or (masked and plan.mask_fn is not None)


def block_positions(b, n, q_first, k_first, shape, used, row_iota=None, col_iota=None):
    """(batch, head, q_pos, k_pos) of a block as a user's mask_fn / score_fn gets them: int32
    [bq, bk] each, at global positions (q_pos = row + q_offset, k_pos = key index), as the
    Triton and TPU kernels give them. `q_first` / `k_first` are the block's first positions.

    Only the `used` ones are built (`used_positions`; the others are zeros, which the
    functions do not read): jax 0.11's Mosaic GPU infers every array's layout and finds none
    for one nothing uses. The kernel's `row_iota()` is a [bq, bk] iota in the WGMMA layout and
    its `col_iota()` a [bk] wgmma column vector, a few registers a thread, broadcast over the
    block: as a [bq, bk] iota the key positions spilled at H = 256, and broadcast from a row
    vector the query positions left jax 0.11 no layout for a bool made of them and a constant.
    """
    bq, bk = shape
    row_iota = row_iota or (lambda: lax.broadcasted_iota(jnp.int32, shape, 0))
    col_iota = col_iota or (lambda: lax.iota(jnp.int32, bk))
    full = lambda x: jnp.full(shape, x, jnp.int32)  # noqa: E731
    zero = full(0)
    rows = q_first + row_iota() if used[2] else zero
    cols = lax.broadcast_in_dim(k_first + col_iota(), shape, [1]) if used[3] else zero
    return full(b) if used[0] else zero, full(n) if used[1] else zero, rows, cols


def block_scores(raw: Array, plan: Plan, where=None) -> Array:
    """The scores of a block from raw = q·kᵀ: `score_block`'s log2-domain s₂ without a
    score_fn; with one, score_fn(s, *where) in the natural domain (`Plan.log2_domain`), in
    the order of every path: scale·q·kᵀ → soft cap → score_fn (no bias here)."""
    if plan.score_fn is None:
        return score_block(raw, plan.scale, plan.soft_cap)
    s = score_block(raw, plan.scale, plan.soft_cap, unit=1.0)
    return jnp.broadcast_to(plan.score_fn(s, *where), s.shape).astype(jnp.float32)


def user_mask(plan: Plan, where, shape: tuple[int, int]) -> Array | None:
    """mask_fn(*where) as a bool [bq, bk] (None without a mask_fn)."""
    if plan.mask_fn is None:
        return None
    return jnp.broadcast_to(plan.mask_fn(*where), shape)


def mask_block(
    s: Array, cols: Array, kstart: Array, kend: Array, segq=None, segk=None, allowed=None
) -> Array:
    """s [bq, bk] with −inf where row r may not see key cols[r, c]: outside [kstart_r, kend_r),
    or (segment ids) where segq_r ≠ segk_c, or where `allowed` (a mask_fn's bool [bq, bk],
    `user_mask`) is False. kstart/kend/segq are [bq], segk [bk]."""
    row = lambda x: lax.broadcast_in_dim(x, s.shape, [0])
    ok = (cols >= row(kstart)) & (cols < row(kend))
    if segq is not None:
        ok = ok & (row(segq) == lax.broadcast_in_dim(segk, s.shape, [1]))
    if allowed is not None:
        ok = ok & allowed
    return jnp.where(ok, s, -jnp.inf)


def initial_stats(sink2: Array) -> tuple[Array, Array]:
    """(m, l) before the first block: a sink (in the scores' domain; −inf for none) is one more
    score with no value, so max = sink and sum = 1 (FlashAttention's −inf and 0 without one)."""
    return sink2, jnp.where(sink2 > -jnp.inf, 1.0, 0.0).astype(jnp.float32)


def softmax_step(s: Array, m: Array, l: Array, exp=jnp.exp2):
    """One block of the online softmax in the log2 domain (`exp` = jnp.exp: the natural
    domain): (p, alpha, m', l').

    m' = max(m, maxₖ s); p = 2^(s − m'); alpha = 2^(m − m') rescales what came before;
    l' = alpha·l + Σₖ p. While a row has seen no key (m' = −inf) the shift is 0, so p = alpha = 0
    and no −inf − (−inf) is formed.
    """
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = exp(m - shift)
    p = exp(s - lax.broadcast_in_dim(shift, s.shape, [0]))
    return p, alpha, m_new, l * alpha + jnp.sum(p, axis=1)


def online_block(raw, carry, plan: Plan, dtype, mask_args, pv, before_pv=None, where=None):
    """One key block of the loop: (acc, m, l) -> (acc', m', l') given raw = q·kᵀ.

    `mask_args` is None for a block every row sees whole, else (cols, kstart, kend, segq,
    segk) for `mask_block`; `pv(acc, p)` returns acc + p·V; `before_pv` runs between the
    softmax and that product (the kernel's barriers); `where` is the block's
    `block_positions` when a mask_fn or score_fn needs them.
    """
    acc, m, l = carry
    s = block_scores(raw, plan, where)
    if mask_args is not None:
        s = mask_block(s, *mask_args, allowed=user_mask(plan, where, s.shape))
    p, alpha, m, l = softmax_step(s, m, l, jnp.exp2 if plan.log2_domain else jnp.exp)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    p = p.astype(dtype)
    if max(plan.head_dims) <= 128:  # the order attention_mgpu.py found fastest at H ≤ 128
        acc, m, l, p = lax.optimization_barrier((acc, m, l, p))
    if before_pv is not None:
        before_pv()
    return pv(acc, p), m, l


def finish(acc: Array, m: Array, l: Array, log2_domain: bool = True) -> tuple[Array, Array]:
    """(out float32 [bq, Hv], natural-log lse [bq]): acc/l, and m·ln2 + ln l (m + ln l for
    natural-domain scores); rows that saw no key and no sink (l = 0) give 0 and −inf."""
    valid = l > 0
    safe = jnp.where(valid, l, 1.0)
    inv = jnp.where(valid, 1.0 / safe, 0.0)
    out = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
    lse = (m * LN2 if log2_domain else m) + jnp.log(safe)
    return out, jnp.where(valid, lse, -jnp.inf)


def sink_rows(sinks: Array, block_q: int, log2_domain: bool = True) -> Array:
    """float32 [N, block_q]: each head's sink in the scores' domain, one copy per row."""
    unit = LOG2E if log2_domain else 1.0
    return jnp.broadcast_to((sinks.astype(jnp.float32) * unit)[:, None], (sinks.shape[0], block_q))


class Inputs(NamedTuple):
    """The kernel's inputs besides q, k, v (`prepare`)."""

    kstart: Array  # int32 [B, Tp]: `key_ranges`
    kend: Array  # int32 [B, Tp]
    sched: Array  # int32 [B, tiles, 8]: `block_schedule`, column 6 the batch's q_offset
    segq: Array | None  # int32 [B, Tp]
    segk: Array | None  # int32 [B, Sp]
    sink2: Array | None  # float32 [N, block_q]: `sink_rows`


def prepare(plan: Plan, meta: Array, seq_q: int, seq_k: int, q_seg, kv_seg, sinks) -> Inputs:
    """The per-row key ranges, the block schedule, and the segment ids and sinks as the kernel
    reads them, from dispatch's `META` columns (inputs padded to whole tiles and blocks). The
    schedule's column 6 holds the batch's q_offset (column 0 of `META`): a mask_fn / score_fn
    gets global query positions."""
    tile = COMPUTE_WGS * plan.block_q
    assert seq_q % tile == 0 and seq_k % plan.block_k == 0, (seq_q, seq_k, tile, plan.block_k)
    kstart, kend = key_ranges(meta, seq_q, seq_k)
    seg_range = segq = segk = None
    if plan.has_segments:
        segq, segk = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
        seg_range = segment_ranges(segq, segk, meta[:, 1], meta[:, 2], tile, plan.block_k, "q")
    none_whole = plan.mask_fn is not None
    sched = block_schedule(kstart, kend, plan.block_q, plan.block_k, seg_range, none_whole)
    sched = sched.at[:, :, 6].set(meta[:, :1])
    sink2 = sink_rows(sinks, plan.block_q, plan.log2_domain) if plan.has_sinks else None
    return Inputs(kstart, kend, sched, segq, segk, sink2)


def emulate(plan: Plan, q, k, v, inputs: Inputs):
    """The kernel's loops in plain jnp, one (batch, head, tile, warpgroup) program at a time
    under vmap: the same schedule, three phases and `online_block`, with jnp.dot for wgmma.

    (out [B, Tp, N, Hv] in q's dtype, lse float32 [B, N, Tp]): the kernel's outputs, for the
    CPU checks of everything but the kernel's memory traffic and barriers.
    """
    batch, seq_q, heads, _ = q.shape
    bq, bk = plan.block_q, plan.block_k
    tiles = seq_q // (COMPUTE_WGS * bq)
    kstart, kend, sched, segq, segk, sink2 = inputs

    def program(b, n, t, w):
        q_base = (t * COMPUTE_WGS + w) * bq
        rows = lambda x: lax.dynamic_slice_in_dim(x[b], q_base, bq)  # noqa: E731
        qb = lax.dynamic_slice_in_dim(q[b, :, n], q_base, bq)
        kh, vh = k[b, :, n // plan.groups], v[b, :, n // plan.groups]
        ks, ke = rows(kstart), rows(kend)
        sq = rows(segq) if plan.has_segments else None
        lo, hi = sched[b, t, 0], sched[b, t, 1]
        flo, fhi = sched[b, t, 2 + 2 * w], sched[b, t, 3 + 2 * w]
        q_first = q_base + sched[b, t, 6]  # the global position of the block's first row

        def step(j, carry, masked):
            kb = lax.dynamic_slice_in_dim(kh, j * bk, bk)
            vb = lax.dynamic_slice_in_dim(vh, j * bk, bk)
            raw = jnp.dot(qb, kb.T, preferred_element_type=jnp.float32)
            where = None
            if applies_user_fns(plan, masked):
                used = used_positions(plan, (bq, bk), masked)
                where = block_positions(b, n, q_first, j * bk, (bq, bk), used)
            mask_args = None
            if masked:
                cols = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
                sk = lax.dynamic_slice_in_dim(segk[b], j * bk, bk) if plan.has_segments else None
                mask_args = (cols, ks, ke, sq, sk)

            def pv(acc, p):
                return acc + jnp.dot(p, vb, preferred_element_type=jnp.float32)

            return online_block(raw, carry, plan, q.dtype, mask_args, pv, where=where)

        s0 = jnp.full((bq,), -jnp.inf, jnp.float32) if sink2 is None else sink2[n]
        m0, l0 = initial_stats(s0)
        acc0 = jnp.zeros((bq, v.shape[-1]), jnp.float32)
        acc, m, l = three_phase(lo, flo, fhi, hi, step, (acc0, m0, l0))
        out, lse = finish(acc, m, l, plan.log2_domain)
        return out.astype(q.dtype), lse

    idx = jnp.stack(
        jnp.meshgrid(
            jnp.arange(batch),
            jnp.arange(heads),
            jnp.arange(tiles),
            jnp.arange(COMPUTE_WGS),
            indexing="ij",
        ),
        -1,
    ).reshape(-1, 4)
    out, lse = jax.vmap(lambda i: program(*i))(idx)  # (programs, bq, Hv), (programs, bq)
    out = out.reshape(batch, heads, tiles, COMPUTE_WGS, bq, -1).reshape(batch, heads, seq_q, -1)
    lse = lse.reshape(batch, heads, seq_q)
    return out.transpose(0, 2, 1, 3), lse


# -------------------------------------------------------------------------------- the kernel


def _kernel(*refs, plan: Plan):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from chunkattn.pallas import mosaic_compat as compat

    refs = list(refs)
    q_ref, k_ref, v_ref, kstart_ref, kend_ref, sched_ref = refs[:6]
    rest = refs[6:]
    segq_ref = segk_ref = sinks_ref = None
    if plan.has_segments:
        segq_ref, segk_ref = rest.pop(0), rest.pop(0)
    if plan.has_sinks:
        sinks_ref = rest.pop(0)
    o_ref, lse_ref, smem, barriers = rest
    q_smem2, o_smem2, k_smem, v_smem, lse_smem2, p_smem2 = smem
    k_ready, v_ready, q_ready, k_free, v_free, turn = barriers

    bq, bk, stages = plan.block_q, plan.block_k, plan.num_stages
    dtype = q_ref.dtype
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    t = lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    lo, hi = sched_ref[b, t, 0], sched_ref[b, t, 1]

    def take_turn():  # the two compute warpgroups alternate on the tensor cores
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        if not plan.interpret:
            plgpu.set_max_registers(232, action="increase")
        q_smem = q_smem2.at[wg]
        o_smem = q_smem if o_smem2 is None else o_smem2.at[wg]  # Q's buffer is free by then
        p_smem = None if p_smem2 is None else p_smem2.at[wg]
        flo, fhi = sched_ref[b, t, 2 + 2 * wg], sched_ref[b, t, 3 + 2 * wg]
        q_base = (t * COMPUTE_WGS + wg) * bq
        rows = pl.ds(q_base, bq)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem, q_ready.at[wg])
        kstart = compat.load(kstart_ref.at[b, rows], compat.ROW)
        kend = compat.load(kend_ref.at[b, rows], compat.ROW)
        segq = compat.load(segq_ref.at[b, rows], compat.ROW) if plan.has_segments else None
        if plan.has_sinks:
            sink2 = compat.load(sinks_ref.at[h], compat.ROW)
        else:
            sink2 = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), compat.ROW)
        m0, l0 = initial_stats(sink2)
        acc0 = plgpu.layout_cast(jnp.zeros((bq, plan.head_dims[1]), jnp.float32), compat.WGMMA)
        plgpu.barrier_wait(q_ready.at[wg])

        @pl.when(hi > lo)
        def _():
            plgpu.barrier_wait(k_ready.at[0])

        pl.when(wg == 1)(take_turn)

        def row_iota():
            return plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=compat.WGMMA)

        def col_iota():
            return plgpu.broadcasted_iota(jnp.int32, (bk,), 0, layout=compat.COL)

        q_first = q_base + sched_ref[b, t, 6] if plan.has_positions else None

        def step(j, carry, masked):
            slot = lax.rem(j - lo, stages)
            raw = compat.mma(q_smem, compat.transpose(k_smem.at[slot]), (bq, bk), take_turn)
            plgpu.barrier_arrive(k_free.at[slot])
            where, used = None, (False,) * 4
            if applies_user_fns(plan, masked):
                used = used_positions(plan, (bq, bk), masked)
                positions = (q_first, j * bk, (bq, bk), used, row_iota, col_iota)
                where = block_positions(b, h, *positions)
            mask_args = None
            if masked:
                if used[3]:  # the block's key positions, built once
                    cols = where[3]
                else:
                    cols = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=compat.WGMMA)
                    cols = j * bk + cols
                segk = None
                if plan.has_segments:
                    segk = compat.load(segk_ref.at[b, pl.ds(j * bk, bk)], compat.COL)
                mask_args = (cols, kstart, kend, segq, segk)

            def before_pv():  # softmax done: wait for V, then for the tensor cores' turn
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)

            def wait_next_k():
                @pl.when(j + 1 < hi)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(j + 1 - lo, stages)])

            def pv(acc, p):
                return compat.mma_accumulate(acc, p, v_smem.at[slot], p_smem, wait_next_k)

            out = online_block(raw, carry, plan, dtype, mask_args, pv, before_pv, where)
            plgpu.barrier_arrive(v_free.at[slot])
            return out

        acc, m, l = three_phase(lo, flo, fhi, hi, step, (acc0, m0, l0))
        pl.when(wg == 0)(take_turn)
        out, lse = finish(acc, m, l, plan.log2_domain)
        o_smem[...] = out.astype(dtype)
        lse_smem2.at[wg][...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, rows, h])
        plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[b, h, rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        if not plan.interpret:
            plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(h, jnp.asarray(plan.groups, h.dtype))

        def fetch(j, slot):
            keys = pl.ds(j * bk, bk)
            plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem.at[slot], v_ready.at[slot])

        for i in range(stages):  # fill the ring
            pl.when(lo + i < hi)(functools.partial(fetch, lo + i, i))

        def refill(j, carry):  # block j goes where block j − stages was, once both are done
            slot = lax.rem(j - lo, stages)
            keys = pl.ds(j * bk, bk)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem.at[slot], k_ready.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem.at[slot], v_ready.at[slot])
            return carry

        lax.fori_loop(lo + stages, hi, refill, 0)

        # Wait until the last blocks are consumed too: every phase of the "free" barriers is
        # observed before they go (the interpreter checks it; on the GPU it costs an idle wait).
        def drain(j):
            slot = lax.rem(j - lo, stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])

        for i in range(stages):
            pl.when(hi - stages + i >= lo)(functools.partial(drain, hi - stages + i))


def forward(plan: Plan, q, k, v, meta, q_seg=None, kv_seg=None, sinks=None):
    """(out [B, Tp, N, Hv], lse float32 [B, N, Tp], natural log) of inputs padded to whole
    tiles (Tp a multiple of 2·block_q, Sp of block_k), in the Triton forward's conventions:
    rows that see no key and no sink give 0 and −inf."""
    from chunkattn.pallas import mosaic_compat as compat

    inputs = prepare(plan, meta, q.shape[1], k.shape[1], q_seg, kv_seg, sinks)
    return compat.skips_empty_maps(functools.partial(launch, plan))(q, k, v, inputs)


def launch(plan: Plan, q, k, v, inputs: Inputs):
    """The Mosaic GPU kernel on prepared inputs (the interpreter's when `plan.interpret`)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from chunkattn.pallas import mosaic_compat as compat

    batch, seq_q, heads, h = q.shape
    hv = v.shape[-1]
    bq, bk, stages = plan.block_q, plan.block_k, plan.num_stages
    tile = COMPUTE_WGS * bq
    operands = [q, k, v, inputs.kstart, inputs.kend, inputs.sched]
    if plan.has_segments:
        operands += [inputs.segq, inputs.segk]
    if plan.has_sinks:
        operands.append(inputs.sink2)

    def tiled(shape):  # wgmma's operand layout: 8×64-element tiles, 128-byte swizzle
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        return plgpu.SMEM(shape, q.dtype, transforms=transforms)

    smem = (
        tiled((COMPUTE_WGS, bq, h)),
        None if hv == h else tiled((COMPUTE_WGS, bq, hv)),
        tiled((stages, bk, h)),
        tiled((stages, bk, hv)),
        plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
        tiled((COMPUTE_WGS, bq, bk)) if plan.interpret else None,
    )
    barriers = (
        plgpu.Barrier(num_barriers=stages),  # K block ready
        plgpu.Barrier(num_barriers=stages),  # V block ready
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # Q ready
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # K buffer free
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # V buffer free
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),  # whose turn on the tensor cores
    )
    out_type = (
        jax.ShapeDtypeStruct((batch, seq_q, heads, hv), q.dtype),
        jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32),
    )
    extra = {}
    if plan.interpret:
        extra["interpret"] = compat.interpret_params()
    run = plgpu.kernel(
        functools.partial(_kernel, plan=plan),
        out_type=out_type,
        scratch_types=[smem, barriers],
        grid=(heads, seq_q // tile, batch),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name="chunkattn_mosaic_fwd",
        **extra,
    )
    return run(*operands)
