"""The kernels' launch configuration: the validated `PallasConfig` a user passes, the block
sizes chosen per head dim and dtype when it leaves them open (`heuristic`, tuned in
bench/NOTES.md), the block width of a head dim, and the interpreter switch.

Set CHUNKATTN_PALLAS_INTERPRET=1 to run the kernels in the Pallas interpreter (CPU tests).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
from jax.experimental import pallas as pl


def interpret_mode() -> bool:
    return os.environ.get("CHUNKATTN_PALLAS_INTERPRET", "") not in ("", "0")


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """Block sizes and launch parameters of the Pallas kernels (None: per-shape heuristic).

    block_q / block_k tile the forward and dQ kernels; block_q_bwd / block_k_bwd the dK/dV
    kernel; the *_bwd launch parameters serve both backward kernels. Blocks are powers of two
    ≥ 16; warps in {1, 2, 4, 8, 16}; stages 1–8.
    """

    block_q: int | None = None
    block_k: int | None = None
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    num_warps_bwd: int | None = None
    num_stages_bwd: int | None = None
    # "split": dQ in its own kernel (recomputes P and dP: 7 matmuls per block pair in all);
    # "atomic": the dK/dV kernel also adds dS·K into a float32 dQ with atomics (5 matmuls).
    backward: str = "split"

    def __post_init__(self):
        if self.backward not in ("split", "atomic"):
            raise ValueError(
                f"PallasConfig.backward must be 'split' or 'atomic', got {self.backward!r}"
            )
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not _is_pow2(v) or v < 16):
                raise ValueError(f"PallasConfig.{name} must be a power of two >= 16, got {v!r}")
        for name in ("num_warps", "num_warps_bwd"):
            v = getattr(self, name)
            if v is not None and v not in (1, 2, 4, 8, 16):
                raise ValueError(f"PallasConfig.{name} must be 1, 2, 4, 8 or 16, got {v!r}")
        for name in ("num_stages", "num_stages_bwd"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and 1 <= v <= 8):
                raise ValueError(f"PallasConfig.{name} must be in 1..8, got {v!r}")


def heuristic(
    head_dim: int,
    dtype: Any,
    seq_q: int,
    seq_k: int,
    cfg: PallasConfig,
    dense_tiles: bool = False,
) -> dict:
    """Block sizes per head dim and dtype (bench/NOTES.md), clipped to the sequence.

    `dense_tiles`: a dense bias or mask varies along both T and S, so the forward and dQ loops
    also stream a (block_q, block_k) tile of it through shared memory each step.
    """
    wide = jnp.dtype(dtype).itemsize >= 4  # float32 tiles take twice the shared memory
    # H=128 from bench/pallas_tune.py on the H100 (bench/NOTES.md); the others are untuned.
    if head_dim <= 64:
        bq, bk, warps, stages, bq_b, bk_b = 128, 64, 4, 3, 64, 64
    elif head_dim <= 128:
        bq, bk, warps, stages, bq_b, bk_b = 128, 128, 8, 2, 32, 128
    else:
        bq, bk, warps, stages, bq_b, bk_b = 64, 32, 8, 2, 32, 32
    if wide:
        bq, bk, bq_b, bk_b = (
            max(bq // 2, 16),
            max(bk // 2, 16),
            max(bq_b // 2, 16),
            max(bk_b // 2, 16),
        )

    if dense_tiles:
        # At 128×128 bf16 with 2 stages, K and V tiles take 128 KiB, Q 32 KiB, and a pipelined
        # 128×128 bias tile another 64 KiB: past the H100's 227 KiB with Triton's scratch. Half
        # the key block keeps the loop's tiles at ~100 KiB (a prediction, bench/NOTES.md v5).
        bk = max(bk // 2, 16)

    def clip(b: int, n: int) -> int:
        return max(16, min(b, pl.next_power_of_2(n)))

    return dict(
        block_q=clip(cfg.block_q or bq, seq_q),
        block_k=clip(cfg.block_k or bk, seq_k),
        block_q_bwd=clip(cfg.block_q_bwd or bq_b, seq_q),
        block_k_bwd=clip(cfg.block_k_bwd or bk_b, seq_k),
        num_warps=cfg.num_warps or warps,
        num_stages=cfg.num_stages or stages,
        num_warps_bwd=cfg.num_warps_bwd or warps,
        num_stages_bwd=cfg.num_stages_bwd or 2,
    )


def block_width(head_dim: int) -> int:
    """A head dim's block width in the kernels: the next power of two, at least 16.

    The arrays keep their own head dims (no padded copy in HBM): a kernel loads a block with
    the columns past the head dim masked to 0 and stores only the head dim's columns.
    """
    return max(16, pl.next_power_of_2(head_dim))
