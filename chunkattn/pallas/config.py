"""The kernels' launch configuration: the validated `PallasConfig` a user passes, the block
sizes chosen per head dim and dtype when it leaves them open (`heuristic`, tuned in
bench/NOTES.md), the block width of a head dim, and the interpreter switch.

Set CHUNKATTN_PALLAS_INTERPRET=1 to run the kernels in the Pallas interpreter (CPU tests).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def interpret_mode() -> bool:
    return os.environ.get("CHUNKATTN_PALLAS_INTERPRET", "") not in ("", "0")


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """Block sizes and launch parameters of the Pallas kernels (None: per-shape heuristic).

    block_q / block_k tile the forward and dQ kernels (left open, dQ's key block is the
    heuristic's own, half the forward's at H=128); block_q_bwd / block_k_bwd the dK/dV kernel;
    the *_bwd launch parameters serve both backward kernels. Blocks are powers of two
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


def f32_dot_precision(precision: Any) -> str:
    """How the kernels' float32 matrix products run at `precision` (as `dot_product_attention`
    hands it on: None is HIGHEST for float32 inputs there): the input precision that Pallas's
    Triton lowering gives `tt.dot` (jax/_src/pallas/triton/lowering.py, jax 0.10–0.11).

    - "tf32": DEFAULT or HIGH (either operand), or `DotAlgorithmPreset.TF32_TF32_F32`: TF32
      tensor cores (wgmma/mma .tf32; inputs rounded to 10 mantissa bits, float32 sums), as
      XLA's own float32 dots on the GPU at DEFAULT and HIGH (`jax.lax.Precision`'s doc; cuBLAS
      allows TF32 below HIGHEST).
    - "ieee": HIGHEST, or `F32_F32_F32`: exact float32, FMA loops on the CUDA cores.
    - "tf32x3": `TF32_TF32_F32_X3`: three TF32 products (≈ float32 accuracy) on tensor cores.
    - "bf16": the bfloat16/float16 presets (the lowering casts the inputs): tensor cores.
    A bare None (never passed by the API for float32) is DEFAULT to Pallas: "tf32".
    """
    presets = {
        "TF32_TF32_F32": "tf32",
        "TF32_TF32_F32_X3": "tf32x3",
        "F32_F32_F32": "ieee",
    }
    preset = jax.lax.DotAlgorithmPreset
    if isinstance(precision, str) and precision in preset.__members__:
        precision = preset[precision]
    if isinstance(precision, preset):
        if precision == preset.DEFAULT:
            return "tf32"
        return presets.get(precision.name, "bf16")
    if precision is None:
        return "tf32"
    pair = precision if isinstance(precision, tuple | list) else (precision, precision)
    fast = (jax.lax.Precision.DEFAULT, jax.lax.Precision.HIGH)
    return "tf32" if any(jax.lax.Precision(p) in fast for p in pair) else "ieee"


def heuristic(
    head_dim: int,
    dtype: Any,
    seq_q: int,
    seq_k: int,
    cfg: PallasConfig,
    dense_tiles: bool = False,
    precision: Any = jax.lax.Precision.HIGHEST,
) -> dict:
    """Block sizes per head dim (its block width) and dtype, clipped to the sequence.

    bf16/f16 at head dims ≤ 128 are chosen so that no kernel spills registers, forward or
    backward, in any feature (bench/NOTES.md v10): compiled for the H100 (sm_90a) on the CPU
    with bench/compile_report.py over its 14 features at H = 32, 64, 72, 128, bf16 and f16,
    on jax 0.11.2 (the GPU machine's) and 0.10.2. The forward keeps v2's measured 128×128 at
    H=128. What moved from v8's configs, and why:
    - 8 warps at H ≤ 64 (was 4): at 4, the 128-row forward and dQ tiles and the 64×64 dK/dV
      tiles held 255 registers per thread and spilled with dropout or a soft cap.
    - the dQ kernel has its own key block, half the forward's at H=128 (128×64, not 128×128):
      at 128×128 it spilled with a window (H=72) or dropout. A user's block_k sets both.
    - dK/dV 64×64 at H=128 (was 32×128, the same score tile): 32×128 held 255 registers and
      spilled in nearly every feature (its dK and dV accumulators are 128 of them), and ptxas
      serialized its wgmma; 64×64 does not spill on 0.11.2 and its wgmma is not serialized
      (on 0.10.2 it spills 16–132 B at H=72/128 in 9 of the 14 features).
    H > 128 keeps v8's configs (bf16 at H=192/256 did not spill; float32 there not searched).

    float32 follows what its matrix products run on (`precision`, as the API hands it on:
    `f32_dot_precision`), measured the same way (bench/NOTES.md v12, H ≤ 128):
    - TF32 tensor cores (DEFAULT, HIGH): Triton's TF32 tiles hold more registers than bf16's
      (float32 operands) and twice the shared memory. H ≤ 64: bf16's blocks with dK/dV 32×64
      (64×64 spilled with dropout or a 2-D bias); H ≤ 128: forward 64×64, dQ 64×16 (64×64
      spilled 516 B, 64×32 20 B), dK/dV 16×32 (split and atomic; 64×64 spilled 848 B).
    - exact float32 (HIGHEST, the API's default for float32): FMA loops, whose operands Triton
      holds per thread over the whole contraction, so the tiles are small: H ≤ 64 forward and dQ
      32×64, dK/dV 64×32; H ≤ 128 forward 32×16 at 4 warps, dQ 32×16, dK/dV 16×32 (v8's 64×64
      forward spilled 23 KB, dQ 37 KB; dK/dV 32×32 spilled ~500 B without a causal mask); the
      dK/dV kernel there reads K and V in every step.

    `dense_tiles`: a dense bias or mask varies along both T and S, so the kernels also stream
    a (block_q, block_k) tile of it: the forward's key block is halved (shared memory,
    bench/NOTES.md v5; dQ's never exceeds it) and so is dK/dV's query block at H=128 (the
    tile's registers: 64×64 spilled with a 2-D bias there, 32×64 does not). The atomic
    backward halves that query block as well (its dK/dV kernel also holds dS·K: 64×64 spilled
    8–48 B in 12 of 14 features on 0.11.2, 32×64 in none).
    """
    if jnp.dtype(dtype).itemsize < 4:
        kind = "16-bit"
    else:  # float32: TF32 tensor cores, or FMA loops when exact (`f32_dot_precision`)
        kind = "fma" if f32_dot_precision(precision) == "ieee" else "tf32"
    band = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    table = _TABLE[band][kind]
    bq, bk, bk_dq, warps, stages, bq_b, bk_b, warps_b = table

    if dense_tiles:
        # At 128×128 bf16 with 2 stages, K and V tiles take 128 KiB, Q 32 KiB, and a pipelined
        # 128×128 bias tile another 64 KiB: past the H100's 227 KiB with Triton's scratch. Half
        # the key block keeps the loop's tiles at ~100 KiB (a prediction, bench/NOTES.md v5).
        bk = max(bk // 2, 16)
    if (dense_tiles or cfg.backward == "atomic") and band == 128 and kind == "16-bit":
        # dK/dV's registers at H=128: a dense tile, or the atomic mode's dS·K (a float32
        # block_q_bwd × H tile), spilled at 64×64; 32×64 does not.
        bq_b //= 2
    bk_dq = min(bk_dq, bk)

    def clip(b: int, n: int) -> int:
        return max(16, min(b, pl.next_power_of_2(n)))

    return dict(
        block_q=clip(cfg.block_q or bq, seq_q),
        block_k=clip(cfg.block_k or bk, seq_k),
        block_q_bwd=clip(cfg.block_q_bwd or bq_b, seq_q),
        block_k_bwd=clip(cfg.block_k_bwd or bk_b, seq_k),
        block_k_dq=clip(cfg.block_k or bk_dq, seq_k),
        num_warps=cfg.num_warps or warps,
        num_stages=cfg.num_stages or stages,
        num_warps_bwd=cfg.num_warps_bwd or warps_b,
        num_stages_bwd=cfg.num_stages_bwd or 2,
    )


# The default blocks per head-dim band (the block width: ≤ 64, ≤ 128, ≤ 256) and kind of
# matrix product: bf16/f16 ("16-bit"), float32 on TF32 tensor cores ("tf32": DEFAULT, HIGH) or
# exact float32 on FMA loops ("fma": HIGHEST, the API's default for float32), as
# (block_q, block_k, block_k of dQ, warps, stages, block_q_bwd, block_k_bwd, warps_bwd).
# `heuristic`'s docstring says why; bench/NOTES.md v10 (16-bit) and v12 (float32) the figures.
_TABLE = {
    64: {
        "16-bit": (128, 64, 64, 8, 3, 64, 64, 8),
        "tf32": (128, 64, 64, 8, 3, 32, 64, 8),
        "fma": (32, 64, 64, 8, 2, 64, 32, 8),
    },
    128: {
        "16-bit": (128, 128, 64, 8, 2, 64, 64, 8),
        "tf32": (64, 64, 16, 8, 2, 16, 32, 8),
        "fma": (32, 16, 16, 4, 2, 16, 32, 8),
    },
    256: {
        "16-bit": (64, 32, 32, 8, 2, 32, 32, 8),
        "tf32": (32, 16, 16, 8, 2, 16, 16, 8),
        "fma": (32, 16, 16, 8, 2, 16, 16, 8),
    },
}


def block_width(head_dim: int) -> int:
    """A head dim's block width in the kernels: the next power of two, at least 16.

    The arrays keep their own head dims (no padded copy in HBM): a kernel loads a block with
    the columns past the head dim masked to 0 and stores only the head dim's columns.
    """
    return max(16, pl.next_power_of_2(head_dim))
