"""Time the Pallas kernels under several PallasConfigs (fwd and fwd+bwd TFLOP/s), one run.

python bench/pallas_tune.py --seq-len 16384
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

import chunkattn  # noqa: E402
from chunkattn.pallas import PallasConfig  # noqa: E402

FWD = [
    dict(block_q=128, block_k=64, num_warps=8, num_stages=2),
    dict(block_q=128, block_k=128, num_warps=8, num_stages=2),
    dict(block_q=128, block_k=64, num_warps=4, num_stages=3),
    dict(block_q=64, block_k=64, num_warps=4, num_stages=3),
]
BWD = [
    dict(block_q_bwd=64, block_k_bwd=64, num_warps_bwd=8, num_stages_bwd=2),
    dict(block_q_bwd=32, block_k_bwd=128, num_warps_bwd=8, num_stages_bwd=2),
    dict(block_q_bwd=64, block_k_bwd=128, num_warps_bwd=8, num_stages_bwd=2),
    dict(block_q_bwd=32, block_k_bwd=64, num_warps_bwd=4, num_stages_bwd=3),
    dict(block_q_bwd=64, block_k_bwd=64, num_warps_bwd=4, num_stages_bwd=3),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument(
        "--backward",
        nargs="*",
        default=["split", "atomic"],
        choices=["split", "atomic"],
        help="PallasConfig.backward modes to time (each with every BWD block config)",
    )
    args = p.parse_args(argv)
    T, H = args.seq_len, args.head_dim
    B, N = max(16384 // T, 1), 16 if H == 128 else 32
    sets = common.inputs(jax.random.PRNGKey(0), B, T, N, H, jnp.bfloat16, n=2)
    print(common.environment())
    for causal in (True, False):
        flops = common.attention_flops(B, N, T, H, causal)
        variants = []
        if "split" in args.backward:
            variants += [(f, BWD[0]) for f in FWD] + [(FWD[0], b) for b in BWD[1:]]
        if "atomic" in args.backward:
            variants += [(FWD[1], dict(b, backward="atomic")) for b in BWD]
        for fcfg, bcfg in variants:
            cfg = PallasConfig(**fcfg, **bcfg)
            fn = lambda q, k, v, c, cfg=cfg: chunkattn.dot_product_attention(
                q, k, v, is_causal=c, implementation="pallas", config=cfg
            )
            fwd, fwdbwd = common.programs(fn, causal)
            try:
                tf = common.median_seconds(fwd, sets, 7)
                tb = common.median_seconds(fwdbwd, sets, 7)
                res = f"fwd {flops / tf / 1e12:6.1f}  fwd+bwd {3.5 * flops / tb / 1e12:6.1f} TF/s"
            except Exception as e:  # noqa: BLE001
                res = f"{type(e).__name__}: {str(e)[:120]}"
            print(
                f"T={T} H={H} {'causal' if causal else 'full  '} {fcfg} {bcfg}: {res}", flush=True
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
