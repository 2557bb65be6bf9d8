"""The Mosaic GPU interpreter's hang (issue 21) against the size of XLA:CPU's thread pool.

    /tmp/v312/bin/python bench/interpreter_hang.py                   # 1, 2 and 5 threads
    /tmp/v312/bin/python bench/interpreter_hang.py --threads 2 --case causal_gqa_sinks --eager

Runs tests/test_mosaic.py's backward-interpreter case (the dQ and dK/dV kernels interpreted,
the forward emulated, `jax.jit(jax.grad(...))`) once per thread count, each in a fresh process
with PJRT_NPROC set (jaxlib sizes its CPU pools from it when the client starts), and prints
"pass" with the time or "HANG" with the stacks faulthandler dumped after --timeout seconds.
jax >= 0.11 (jax 0.10's interpreter cannot run the kernels). bench/NOTES.md v13 has the runs
and the reason: the interpreter's blocking host callbacks hold XLA:CPU's intra-op threads.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIMS = {
    "causal_gqa_sinks": (64, 64),
    "window_offset_softcap_lengths": (128, 64),
    "segments_unsorted_lengths": (64, 64),
    "empty_rows_sinks": (64, 128),
}

CHILD = """
import faulthandler, sys, time
faulthandler.dump_traceback_later({timeout}, exit=True)
sys.path[:0] = [{root!r}, {tests!r}]
import jax, jax.numpy as jnp
from chunkattn.pallas import mosaic
import test_mosaic as tm

mosaic.launch = mosaic.emulate  # the forward emulated, as in the test
seq_q, seq_k = (130, 300) if {case!r}.startswith("window") else (tm.T, tm.S)
q, k, v = tm._qkv(jnp.bfloat16, *{dims!r}, seq_q=seq_q, seq_k=seq_k, batch=1)
kwargs = tm.cases(batch=1, seq_q=seq_q, seq_k=seq_k)[{case!r}]
proj = jax.random.normal(jax.random.PRNGKey(5), (1, seq_q, tm.N, {dims!r}[1]), jnp.float32)

def loss(q, k, v):
    return jnp.sum(tm._mosaic_bwd(q, k, v, **kwargs).astype(jnp.float32) * proj)

grad = jax.grad(loss, argnums=(0, 1, 2))
t = time.perf_counter()
jax.block_until_ready(grad(q, k, v) if {eager!r} else jax.jit(grad)(q, k, v))
print(f"pass {{time.perf_counter() - t:.1f}} s")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2,5", help="PJRT_NPROC values, comma-separated")
    parser.add_argument("--case", default="window_offset_softcap_lengths", choices=list(DIMS))
    parser.add_argument("--eager", action="store_true", help="jax.grad without jax.jit")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds before a hang")
    args = parser.parse_args()
    code = CHILD.format(
        timeout=args.timeout,
        root=str(ROOT),
        tests=str(ROOT / "tests"),
        case=args.case,
        dims=DIMS[args.case],
        eager=args.eager,
    )
    for threads in args.threads.split(","):
        env = dict(os.environ, PJRT_NPROC=threads, CHUNKATTN_PALLAS_INTERPRET="1")
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
        t = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
        )
        out = run.stdout.strip().splitlines()
        if run.returncode == 0 and out and out[-1].startswith("pass"):
            print(f"PJRT_NPROC={threads} {args.case} eager={args.eager}: {out[-1]}", flush=True)
        else:
            what = "HANG" if "Timeout" in run.stderr else f"FAILED (rc {run.returncode})"
            print(
                f"PJRT_NPROC={threads} {args.case} eager={args.eager}: {what} after "
                f"{time.perf_counter() - t:.0f} s\n{run.stderr[-6000:]}",
                flush=True,
            )


if __name__ == "__main__":
    main()
