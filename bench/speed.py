"""Speed against the peers: milliseconds and TFLOP/s, forward and forward+backward, one run.

FLOPs follow DESIGN §5 (4·B·N·T·S·H, halved for causal; fwd+bwd = 3.5× forward). Each
figure is the median of several timed runs after warm-up, rotating between input sets so that
caches do not flatter anyone; ratios are to dense XLA and (on GPU) to cuDNN measured in the
same run. `--interleave` times the implementations of a case round-robin, run by run, so that a
load on a shared machine falls on all of them alike (the CPU comparisons in bench/NOTES.md).

    .venv/bin/python bench/speed.py           # GPU: bf16, N=16, H=128, B·T=16384, T 1k, 4k, 16k
    .venv/bin/python bench/speed.py --quick   # CPU-sized
    .venv/bin/python bench/speed.py --quick --mask causal --tag variants \
        --impls chunkattn_chunked dense_xla variant_linear variant_delta variant_caterpillar

Writes speed_[<tag>_]<backend>_<date>.csv and .png into --out (default bench/out/, untracked;
`--out bench/results` for a run to commit), one progress line per finished row with an ETA. The
linear-time variants (`variant_*`) are causal only: "unsupported" for full attention; their
TFLOP/s use the softmax FLOP count too, so they compare as times (they do less work).
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

COLUMNS = [
    "impl", "backend", "device", "device_model", "jax_version", "date", "seq_len", "batch",
    "heads", "head_dim", "dtype", "causal", "fwd_ms", "fwdbwd_ms", "fwd_tflops", "fwdbwd_tflops",
    "fwd_vs_dense_xla", "fwdbwd_vs_dense_xla", "fwd_vs_cudnn", "fwdbwd_vs_cudnn", "status",
]  # fmt: skip


def plot(rows: list[dict], path: pathlib.Path):
    """Bars of TFLOP/s per case, forward and forward+backward; returns the saved Figure."""
    from matplotlib.figure import Figure  # no pyplot: no global backend is set or changed

    cases = sorted({(r["seq_len"], r["causal"]) for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig = Figure(figsize=(13, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.8 / max(len(impls), 1)
    for ax, key in ((axes[0], "fwd_tflops"), (axes[1], "fwdbwd_tflops")):
        for n, impl in enumerate(impls):
            vals = []
            for t, c in cases:
                r = next(
                    (
                        r
                        for r in rows
                        if r["impl"] == impl and (r["seq_len"], r["causal"]) == (t, c)
                    ),
                    None,
                )
                vals.append((r or {}).get(key) or 0.0)
            ax.bar(
                [i + n * width for i in range(len(cases))], vals, width, label=common.label(impl)
            )
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels(
            [f"T={common.format_tokens(t)}\n{'causal' if c else 'full'}" for t, c in cases],
            fontsize=8,
        )
        ax.set_title("forward" if key == "fwd_tflops" else "forward+backward")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("TFLOP/s (causal counted at half)")
    axes[1].legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(
        f"{common.device_title(r0)}, jax {r0['jax_version']}, {r0['date']}: "
        f"N={r0['heads']}, H={r0['head_dim']}, {r0['dtype']}, B·T={r0['batch'] * r0['seq_len']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def row_line(r: dict) -> str:
    """One finished row: times and TFLOP/s (four significant digits, so CPU rows are not 0.0)."""
    head = (
        f"{r['impl']:>20} B={r['batch']:<3} T={r['seq_len']:<6} "
        f"{'causal' if r['causal'] else 'full':6} "
    )
    if r["status"] != "ok":
        return head + r["status"]
    return head + (
        f"fwd {r['fwd_ms']:9.2f} ms {common.format_tflops(r['fwd_tflops']):>7} TFLOP/s  "
        f"fwd+bwd {r['fwdbwd_ms']:9.2f} ms {common.format_tflops(r['fwdbwd_tflops']):>7} TFLOP/s"
    )


def table(rows: list[dict]) -> str:
    """TFLOP/s forward / forward+backward and the ratio to dense XLA, one line per row."""
    lines = ["TFLOP/s forward / forward+backward, fwd+bwd speed vs dense XLA"]
    for r in rows:
        case = f"T={r['seq_len']} B={r['batch']} {'causal' if r['causal'] else 'full'}"
        if r["status"] != "ok":
            lines.append(f"{r['impl']:>20} {case:<22} {r['status']}")
            continue
        ratio = r.get("fwdbwd_vs_dense_xla")
        lines.append(
            f"{r['impl']:>20} {case:<22} {common.format_tflops(r['fwd_tflops']):>7} / "
            f"{common.format_tflops(r['fwdbwd_tflops']):<7}"
            + (f" {ratio:.2f}× dense" if ratio else "")
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized problem")
    p.add_argument("--seq-lens", type=int, nargs="*", default=None)
    p.add_argument("--tokens", type=int, default=None, help="B·T (default 16384; quick 2048)")
    p.add_argument("--impls", nargs="*", default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--mask", choices=["causal", "full", "both"], default="both")
    p.add_argument("--reps", type=int, default=None, help="timed runs (default 10; quick 3)")
    common.add_out_arg(p)
    p.add_argument(
        "--tag", type=common.tag_arg, default="", help="inserted in the file names, e.g. 'variants'"
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="time the implementations of each case round-robin (for a shared machine)",
    )
    p.add_argument("--replot", metavar="CSV", help="redraw the plot of a results CSV beside it")
    args = p.parse_args(argv)
    if args.replot:
        path = pathlib.Path(args.replot)
        plot(common.read_rows(path), path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
        return 0
    gpu = jax.default_backend() == "gpu"
    quick = args.quick or not gpu
    tokens = args.tokens or (2048 if quick else 16384)
    seq_lens = args.seq_lens or ([512, 2048] if quick else [1024, 4096, 16384])
    heads = args.heads or (4 if quick else 16)
    head_dim = args.head_dim or (64 if quick else 128)
    dtype = jnp.dtype(args.dtype or ("float32" if quick else "bfloat16"))
    reps = args.reps or (3 if quick else 10)
    impls = common.available()
    if args.impls:
        unknown = set(args.impls) - set(impls)
        if unknown:
            p.error(f"unknown --impls {sorted(unknown)}; available here: {list(impls)}")
        impls = {k: v for k, v in impls.items() if k in args.impls}
    masks = {"causal": [True], "full": [False], "both": [True, False]}[args.mask]
    rows = []
    progress = common.Progress(len(seq_lens) * len(masks) * len(impls))
    for seq_len in seq_lens:
        batch = max(tokens // seq_len, 1)
        sets = common.inputs(
            jax.random.PRNGKey(seq_len), batch, seq_len, heads, head_dim, dtype, n=3
        )
        for causal in masks:
            flops = common.attention_flops(batch, heads, seq_len, head_dim, causal)
            case = []
            timed = {}
            if args.interleave:
                for name, k in (("fwd", 0), ("fwdbwd", 1)):
                    progs = {impl: common.programs(fn, causal)[k] for impl, fn in impls.items()}
                    timed[name] = common.interleaved_medians(progs, sets, reps)
            for impl, fn in impls.items():
                row = dict(
                    common.environment(),
                    impl=impl,
                    seq_len=seq_len,
                    batch=batch,
                    heads=heads,
                    head_dim=head_dim,
                    dtype=dtype.name,
                    causal=causal,
                    status="ok",
                )
                fwd, fwdbwd = common.programs(fn, causal)
                try:
                    for name, program, mult in (("fwd", fwd, 1.0), ("fwdbwd", fwdbwd, 3.5)):
                        if timed:
                            t = timed[name][impl]
                        else:
                            t = common.median_seconds(program, sets, reps)
                        if isinstance(t, Exception):
                            raise t
                        row[f"{name}_ms"] = t * 1e3
                        row[f"{name}_tflops"] = mult * flops / t / 1e12
                except Exception as e:  # noqa: BLE001 - OOM / unsupported are results
                    row["status"] = common.status_of(e)
                case.append(row)
                progress.row(row_line(row))
            for base, col in (("dense_xla", "dense_xla"), ("jax_nn_cudnn", "cudnn")):
                ref = next((r for r in case if r["impl"] == base and r["status"] == "ok"), None)
                for r in case:
                    for name in ("fwd", "fwdbwd"):
                        if ref and r.get(f"{name}_ms"):
                            r[f"{name}_vs_{col}"] = ref[f"{name}_ms"] / r[f"{name}_ms"]
            rows.extend(case)
    print(table(rows))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = common.environment()
    stem = out / common.result_stem("speed", args.tag, env)
    with open(f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, pathlib.Path(f"{stem}.png"))
    print(f"wrote {stem}.csv and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
