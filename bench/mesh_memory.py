"""Per-device memory of chunkattn-train's compiled step on a data × sequence × tensor mesh.

    .venv/bin/python bench/mesh_memory.py --out bench/results   # T=16384, the committed run
    .venv/bin/python bench/mesh_memory.py --quick               # T=256, a small model

Compiles (never runs) the GPT train step of `chunkattn-train` (forward, backward and the AdamW
update, what `--dry-run` reports) at one global sequence length T and batch B on host CPU
devices: on one device without a mesh, on `--mesh sp=n` for n = 1, 2, 4, 8 (dp = tp = 1, on n
devices) and on `--mesh dp=2,sp=2,tp=2` (8 devices). Each program compiles in its own process,
since XLA reads the host device count once. Per device, from `memory_analysis()`:
  temp      temporaries: the activations the backward keeps and its working arrays
  argument  parameters, Adam's moments and the batch (replicated over dp and sp, split over tp)
The default T=16384 gives each device at sp=8 zig-zag pieces of T/16 = 1024 tokens, two of the
CPU's default 512-token chunks; where a piece is a single chunk (T=8192 at sp=8) the ring's
temporaries come out several times larger (README, "Context parallelism").
Writes mesh_memory_[<tag>_]<backend>_<date>.json into --out (default bench/out/, untracked).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
MESHES = (None, "sp=1", "sp=2", "sp=4", "sp=8", "dp=2,sp=2,tp=2")  # None: one device, no mesh


def devices(mesh: str | None) -> int:
    sizes = [int(part.split("=")[1]) for part in mesh.split(",")] if mesh else [1]
    n = 1
    for s in sizes:
        n *= s
    return n


def model_args(a: argparse.Namespace) -> list[str]:
    """chunkattn-train's options for the measured step."""
    return [
        *("--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size)),
        *("--layers", str(a.layers), "--dim", str(a.dim), "--heads", str(a.heads)),
    ]


def measure(argv: list[str]) -> dict:
    """In the child: the step's compiled memory per device (chunkattn.train.compiled_memory)."""
    import jax

    from chunkattn import train

    t0 = time.perf_counter()
    mem = train.compiled_memory(train.parse_args(argv))
    return {
        **{f"{k}_bytes": v for k, v in mem.items()},
        "compile_s": round(time.perf_counter() - t0, 1),
        "device_count": jax.device_count(),
    }


def run_child(mesh: str | None, argv: list[str], timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices(mesh)}"
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, __file__, "--child", *argv, *(["--mesh", mesh] if mesh else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":  # the options are chunkattn-train's
        print(json.dumps(measure(argv[1:])))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=16384, help="global T (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="global B (default: %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="blocks (default: %(default)s)")
    p.add_argument("--dim", type=int, default=256, help="model width (default: %(default)s)")
    p.add_argument("--heads", type=int, default=8, help="heads (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="T=256, 1 layer, dim 32, 4 heads")
    p.add_argument("--timeout", type=float, default=900, help="seconds per program")
    p.add_argument("--tag", default="", help="a word in the file name, e.g. T8192")
    sys.path.insert(0, str(HERE))
    import common

    common.add_out_arg(p)
    a = p.parse_args(argv)
    if a.quick:
        a.seq_len, a.layers, a.dim, a.heads = 256, 1, 32, 4
    train_argv = model_args(a)
    progress = common.Progress(len(MESHES))
    rows = []
    for mesh in MESHES:
        row = {"mesh": mesh or "none (one device)", "devices": devices(mesh)}
        row |= run_child(mesh, train_argv, a.timeout)
        row["temp_mib"] = round(row["temp_bytes"] / 2**20, 1)
        row["argument_mib"] = round(row["argument_bytes"] / 2**20, 1)
        rows.append(row)
        progress.row(
            f"{row['mesh']}: temp {row['temp_mib']} MiB, arguments "
            f"{row['argument_mib']} MiB per device"
        )
    env = common.environment()
    sp1 = next(r for r in rows if r["mesh"] == "sp=1")["temp_bytes"]
    for r in rows:
        r["temp_vs_sp1"] = round(r["temp_bytes"] / sp1, 3)
    result = {
        "command": ".venv/bin/python bench/mesh_memory.py " + " ".join(argv),
        "device": f"host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=n per "
        f"program, set by the script) on {env['device_model']}",
        "jax_version": env["jax_version"],
        "date": env["date"],
        "train_args": " ".join(train_argv),
        "note": "per-device bytes of the compiled chunkattn-train step (forward, backward, "
        "AdamW) from memory_analysis(), compile only; causal GPT, float32",
        "rows": rows,
    }
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "".join(f"_{t}" for t in ("quick" if a.quick else "", a.tag) if t)
    path = out / f"mesh_memory{tag}_{env['backend']}_{env['date']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
