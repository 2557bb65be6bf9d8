"""Pick the chunked path's default chunk sizes from measurements on this backend.

Times forward and forward+backward of `dot_product_attention(implementation="chunked")` for
several (q_chunk_size, kv_chunk_size), next to dense XLA attention in the same run, and prints
TFLOP/s (DESIGN §5: 4·B·N·T·S·H, halved for causal; fwd+bwd = 3.5× forward).

    .venv/bin/python bench/chunk_sizes.py            # GPU defaults (bf16, N=16, H=128)
    .venv/bin/python bench/chunk_sizes.py --quick    # CPU-sized
"""

from __future__ import annotations

import argparse
import csv
import datetime
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

import chunkattn  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized problem")
    p.add_argument("--out", default=None, help="CSV path")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    if args.quick:
        dtype, heads, head_dim, cases = jnp.float32, 4, 64, [(1, 4096)]
        chunks = [(128, 128), (256, 256), (512, 512), (1024, 1024), (512, 1024)]
    else:
        dtype, heads, head_dim, cases = jnp.bfloat16, 16, 128, [(1, 16384), (16, 1024)]
        chunks = [(512, 512), (1024, 1024), (1024, 2048), (2048, 1024), (2048, 2048)]
    device = jax.devices()[0].device_kind
    date = datetime.date.today().isoformat()
    rows = []
    progress = common.Progress(len(cases) * 2 * (len(chunks) + 1))
    for batch, T in cases:
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        sets = []
        for kk in keys:
            q, k, v, do = (
                jax.random.normal(x, (batch, T, heads, head_dim), dtype)
                for x in jax.random.split(kk, 4)
            )
            sets.append((q, k, v, do))
        for causal in (True, False):
            flops = 4 * batch * heads * T * T * head_dim / (2 if causal else 1)
            impls = {"dense_xla": lambda q, k, v, c=causal: common.dense_xla(q, k, v, c)}
            for tq, tk in chunks:
                cfg = chunkattn.ChunkConfig(tq, tk)
                impls[f"chunked_{tq}x{tk}"] = lambda q, k, v, c=causal, cfg=cfg: (
                    chunkattn.dot_product_attention(
                        q, k, v, is_causal=c, implementation="chunked", config=cfg
                    )
                )
            for name, f in impls.items():
                fwd = jax.jit(lambda q, k, v, do, f=f: f(q, k, v))
                fb = jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
                row = dict(
                    impl=name,
                    device=device,
                    jax=jax.__version__,
                    date=date,
                    batch=batch,
                    seq_len=T,
                    heads=heads,
                    head_dim=head_dim,
                    dtype=jnp.dtype(dtype).name,
                    causal=causal,
                )
                try:
                    tf = common.median_seconds(fwd, sets, args.reps)
                    tfb = common.median_seconds(fb, sets, args.reps)
                    row.update(
                        fwd_ms=tf * 1e3,
                        fwdbwd_ms=tfb * 1e3,
                        fwd_tflops=flops / tf / 1e12,
                        fwdbwd_tflops=3.5 * flops / tfb / 1e12,
                    )
                except Exception as e:  # noqa: BLE001 - an OOM is a result, not a crash
                    row.update(status=f"{type(e).__name__}: {str(e)[:80]}")
                rows.append(row)
                progress.row(
                    f"{name:>22} B={batch:<3} T={T:<6} causal={causal!s:5} "
                    + (
                        f"fwd {row['fwd_ms']:8.2f} ms "
                        f"{common.format_tflops(row['fwd_tflops']):>7} TFLOP/s  fwd+bwd "
                        f"{row['fwdbwd_ms']:8.2f} ms "
                        f"{common.format_tflops(row['fwdbwd_tflops']):>7} TFLOP/s"
                        if "fwd_ms" in row
                        else row["status"]
                    )
                )
    if args.out:
        fields = sorted({k for r in rows for k in r})
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
