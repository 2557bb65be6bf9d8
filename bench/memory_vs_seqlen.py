"""Memory against sequence length: chunkattn vs dense attention and the peers. The main job.

For each implementation and T (powers of two), forward and forward+backward, causal and/or
full: the compiled program's temp bytes (`memory_analysis()`), and on GPU the measured peak
device memory of running it (each measurement in a fresh process, so peaks do not mix). An
out-of-memory is recorded as status OOM; larger T for that implementation are then skipped.

    .venv/bin/python bench/memory_vs_seqlen.py --quick   # T = 1k..16k (CPU: compile only)
    .venv/bin/python bench/memory_vs_seqlen.py           # T = 1k..1M (GPU: compiled and run)
    .venv/bin/python bench/memory_vs_seqlen.py --seq-lens 1048576 --impls chunkattn_chunked
    .venv/bin/python bench/memory_vs_seqlen.py --quick --tag variants \
        --impls chunkattn_chunked variant_linear variant_delta variant_caterpillar

Writes memory_vs_seqlen_[<tag>_]<backend>_<date>.csv and .png into --out (default bench/out/,
untracked; `--out bench/results` for a run to commit), one progress line per finished row with
an ETA. The linear-time variants (`variant_*`, causal only) are included by default.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

COLUMNS = [
    "impl", "backend", "device", "device_model", "jax_version", "date", "seq_len", "batch",
    "heads", "head_dim", "dtype", "causal", "fwd_temp_bytes", "fwdbwd_temp_bytes", "fwd_peak_bytes",
    "fwdbwd_peak_bytes", "status",
]  # fmt: skip


def measure(impl: str, seq_len: int, causal: bool, args, run: bool) -> dict:
    """One row: compiled temp bytes, and (run=True) peak bytes of actually running it."""
    fn = common.available()[impl]
    dtype = jnp.dtype(args.dtype)
    row = _row(impl, seq_len, causal, args)
    shape = jax.ShapeDtypeStruct((args.batch, seq_len, args.heads, args.head_dim), dtype)
    fwd, fwdbwd = common.programs(fn, causal)
    status = "ok" if run else "compiled"
    for name, program in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        try:
            compiled = program.lower(shape, shape, shape, shape).compile()
            row[f"{name}_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
            if run:
                (data,) = common.inputs(
                    jax.random.PRNGKey(0), args.batch, seq_len, args.heads, args.head_dim, dtype
                )
                jax.block_until_ready(compiled(*data))
                row[f"{name}_peak_bytes"] = common.peak_bytes()
                del data
        except Exception as e:  # noqa: BLE001 - OOM / unsupported are results
            status = common.status_of(e)
            break
    row["status"] = status
    return row


def measure_in_subprocess(impl: str, seq_len: int, causal: bool, args) -> dict:
    """GPU peaks are per process: measure each configuration in a fresh one."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps([impl, seq_len, causal]),
        "--batch",
        str(args.batch),
        "--heads",
        str(args.heads),
        "--head-dim",
        str(args.head_dim),
        "--dtype",
        args.dtype,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), timeout=1800)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    text = (proc.stderr or "")[-2000:]
    status = "OOM" if common.is_oom(RuntimeError(text)) else f"error: exit {proc.returncode}"
    return dict(_row(impl, seq_len, causal, args), status=status)


# GPU memory: jax reserves XLA_PYTHON_CLIENT_MEM_FRACTION (default 75%) of the device in the
# first process that touches it. The parent only orchestrates, so it must reserve nothing (else
# each worker gets the last quarter, and dense attention ran out of memory at T=16k in workers
# while it ran in one process); each worker takes one pool of 90%. peak_bytes_in_use counts
# allocations, not the pool, so the reservation does not inflate the measured peaks.
PARENT_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
WORKER_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90"}


def worker_env() -> dict[str, str]:
    return dict(os.environ, **WORKER_ENV)


def _row(impl: str, seq_len: int, causal: bool, args) -> dict:
    """The identifying columns of one result row."""
    return dict(
        common.environment(),
        impl=impl,
        seq_len=seq_len,
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        dtype=jnp.dtype(args.dtype).name,
        causal=causal,
    )


def plot(rows: list[dict], path: pathlib.Path):
    """Memory against T, log-log, forward and forward+backward; returns the saved Figure."""
    from matplotlib.figure import Figure  # no pyplot: no global backend is set or changed

    fig = Figure(figsize=(12, 4.8))
    axes = fig.subplots(1, 2, sharey=True)
    peak = any(r.get("fwd_peak_bytes") for r in rows)
    series = list(dict.fromkeys((r["impl"], r["causal"]) for r in rows))
    masks = {c for _, c in series}
    values, lengths = [], []
    for ax, key, title in ((axes[0], "fwd", "forward"), (axes[1], "fwdbwd", "forward+backward")):
        for n, (impl, causal) in enumerate(series):
            # One kind of figure per plot: measured peaks (a GPU run; a program that ran out of
            # memory has none) or compiled temp bytes.
            kind = f"{key}_peak_bytes" if peak else f"{key}_temp_bytes"
            pts = sorted(
                (r["seq_len"], r[kind])
                for r in rows
                if r["impl"] == impl and r["causal"] == causal and r.get(kind)
            )
            if pts:
                name = common.label(impl)
                if len(masks) > 1:
                    name += f", {'causal' if causal else 'full'}"
                xs, ys = zip(*pts, strict=True)
                values += ys
                lengths += xs
                ax.plot(
                    xs,
                    ys,
                    marker="os^vDx*+"[n % 8],
                    linestyle=("-", "--", ":")[n % 3],
                    label=name,
                )
        ax.set_title(f"{title}: {'peak' if peak else 'compiled temporary'} memory")
        ax.set_xlabel("sequence length T (tokens)")
        ax.grid(True, which="major", alpha=0.3)
    if values:
        for ax in axes:
            common.memory_axis(ax, values)
            common.tokens_axis(ax, lengths)
    axes[0].set_ylabel("peak device memory" if peak else "compiled temp memory (memory_analysis)")
    axes[1].legend(fontsize=7)
    r0 = rows[0]
    mask = "causal" if masks == {True} else "full" if masks == {False} else "causal and full"
    fig.suptitle(
        f"{common.device_title(r0)}, jax {r0['jax_version']}, {r0['date']}: "
        f"B={r0['batch']}, N={r0['heads']}, H={r0['head_dim']}, {r0['dtype']}, {mask}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def table(rows: list[dict]) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lens = sorted({r["seq_len"] for r in rows})
    lines = [
        "fwd+bwd compiled temp MiB (causal if measured, else full)",
        f"{'impl':>22} " + " ".join(f"{t:>9}" for t in lens),
    ]
    for impl in impls:
        cells = []
        for t in lens:
            rs = [r for r in rows if r["impl"] == impl and r["seq_len"] == t]
            rs.sort(key=lambda r: not r["causal"])
            r = rs[0] if rs else None
            if r is None:
                cells.append("-")
            elif r.get("fwdbwd_temp_bytes") is not None:
                cells.append(f"{r['fwdbwd_temp_bytes'] / 2**20:.1f}")
            else:
                cells.append(r["status"])
        lines.append(f"{impl:>22} " + " ".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T = 1k..16k, CPU-sized")
    p.add_argument("--seq-lens", type=int, nargs="*", default=None)
    p.add_argument("--impls", nargs="*", default=None, help="subset of implementations")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="default 8 (CPU) / 16 (GPU)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default=None, help="default float32 (CPU) / bfloat16 (GPU)")
    p.add_argument("--mask", choices=["causal", "full", "both"], default="causal")
    common.add_out_arg(p)
    p.add_argument(
        "--tag", type=common.tag_arg, default="", help="inserted in the file names, e.g. 'variants'"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--replot", metavar="CSV", help="redraw the plot of a results CSV beside it")
    args = p.parse_args(argv)
    if args.replot:
        path = pathlib.Path(args.replot)
        plot(common.read_rows(path), path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
        return 0
    if not args.worker:
        os.environ.update(PARENT_ENV)  # read when jax first touches a device, just below
    gpu = jax.default_backend() == "gpu"
    args.heads = args.heads or (16 if gpu else 8)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.worker:
        impl, seq_len, causal = json.loads(args.worker)
        print(json.dumps(measure(impl, seq_len, causal, args, run=True)), flush=True)
        return 0
    if args.seq_lens is None:
        top = 16 if args.quick else 1024  # x 1024 tokens
        args.seq_lens = [1024 * 2**i for i in range(top.bit_length()) if 2**i <= top]
    impls = list(common.available())
    if args.impls:
        unknown = set(args.impls) - set(impls)
        if unknown:
            p.error(f"unknown --impls {sorted(unknown)}; available here: {impls}")
        impls = [i for i in impls if i in args.impls]
    masks = {"causal": [True], "full": [False], "both": [True, False]}[args.mask]
    rows = []
    progress = common.Progress(len(impls) * len(masks) * len(args.seq_lens))
    for impl in impls:
        for causal in masks:
            failed = None
            for seq_len in sorted(args.seq_lens):
                if failed:  # a larger T will not fit either
                    row = dict(rows[-1], seq_len=seq_len, status=failed)
                    for k in (
                        "fwd_temp_bytes",
                        "fwdbwd_temp_bytes",
                        "fwd_peak_bytes",
                        "fwdbwd_peak_bytes",
                    ):
                        row.pop(k, None)
                else:
                    row = (
                        measure_in_subprocess(impl, seq_len, causal, args)
                        if gpu
                        else measure(impl, seq_len, causal, args, run=False)
                    )
                    if row["status"] in ("OOM", "unsupported"):
                        failed = row["status"]
                rows.append(row)
                progress.row(
                    f"{impl:>22} T={seq_len:<8} {'causal' if causal else 'full':6} "
                    f"fwd {_mib(row.get('fwd_temp_bytes'))} fwd+bwd "
                    f"{_mib(row.get('fwdbwd_temp_bytes'))} MiB temp  peak "
                    f"{_mib(row.get('fwdbwd_peak_bytes'))} MiB  {row['status']}"
                )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = common.environment()
    stem = out / common.result_stem("memory_vs_seqlen", args.tag, env)
    with open(f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, pathlib.Path(f"{stem}.png"))
    print(table(rows))
    print(f"wrote {stem}.csv and {stem}.png")
    return 0


def _mib(b) -> str:
    return f"{b / 2**20:10.1f}" if b is not None else f"{'-':>10}"


if __name__ == "__main__":
    sys.exit(main())
