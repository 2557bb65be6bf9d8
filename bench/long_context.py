"""One long sequence, forward and forward+backward, on one device: does it fit, and how fast.

    .venv/bin/python bench/long_context.py --seq-len 1048576 --impl chunked

Reports wall time (one warm-up-free timed run after compilation, block_until_ready), TFLOP/s
(DESIGN §5, causal at half), compiled temp bytes and, on GPU, peak device memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import jax
import jax.numpy as jnp

import chunkattn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=1 << 20)
    p.add_argument("--impl", default="chunked", help="chunkattn implementation, or 'auto'")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--full", action="store_true", help="full instead of causal attention")
    p.add_argument("--json", default=None, help="append the result as a JSON line here")
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="time the first run after compiling (for runs of minutes)",
    )
    args = p.parse_args(argv)
    T, N, H, causal = args.seq_len, args.heads, args.head_dim, not args.full
    impl = None if args.impl == "auto" else args.impl
    shape = (1, T, N, H)
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, do = (jax.random.normal(x, shape, jnp.bfloat16) for x in ks)
    f = lambda q, k, v: chunkattn.dot_product_attention(
        q, k, v, is_causal=causal, implementation=impl
    )
    fwd = jax.jit(f)
    fb = jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))
    flops = 4 * N * T * T * H / (2 if causal else 1)
    result = dict(
        impl=args.impl,
        device=jax.devices()[0].device_kind,
        jax=jax.__version__,
        date=datetime.date.today().isoformat(),
        seq_len=T,
        heads=N,
        head_dim=H,
        causal=causal,
        dtype="bfloat16",
    )
    for name, fn, a, mult in (("fwd", fwd, (q, k, v), 1.0), ("fwdbwd", fb, (q, k, v, do), 3.5)):
        compiled = fn.lower(*a).compile()
        result[f"{name}_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
        if not args.no_warmup:
            jax.block_until_ready(compiled(*a))  # first run: allocations, autotuning
        t = time.perf_counter()
        jax.block_until_ready(compiled(*a))
        dt = time.perf_counter() - t
        result[f"{name}_s"] = dt
        result[f"{name}_tflops"] = mult * flops / dt / 1e12
        stats = jax.devices()[0].memory_stats() or {}
        result[f"{name}_peak_bytes"] = stats.get("peak_bytes_in_use")
        print(
            f"{name}: {dt:.3f} s, {mult * flops / dt / 1e12:.4g} TFLOP/s, temp "
            f"{result[f'{name}_temp_bytes'] / 2**30:.2f} GiB, peak "
            f"{(result[f'{name}_peak_bytes'] or 0) / 2**30:.2f} GiB",
            flush=True,
        )
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
