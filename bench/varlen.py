"""Packed variable-length batches: varlen_attention against padding and a dense segment mask.

    .venv/bin/python bench/varlen.py           # 64 documents in 16k tokens; sweep 1..1024 docs
    .venv/bin/python bench/varlen.py --quick   # 4k tokens, CPU seconds

Part 1 ("compare"): 64 documents of random lengths (cut points drawn uniformly) summing to
16,384 tokens, causal, forward and forward+backward, all in one run:
  varlen          `chunkattn.varlen_attention` on the packed [total, N, H] arrays
  segments        `chunkattn.dot_product_attention(segment_ids=...)` on the packed batch of one
                  (ids ascending, as people pack by hand), the library's default chunks
  padded          `dot_product_attention` on the documents padded to the longest,
                  [64, max_len, N, H], with query/key lengths
  dense_segments  dense attention with the segment mask (`implementation="xla"`, [T, T] scores)
  whole_square    `dot_product_attention(is_causal=True)` over all tokens, no segments: the cost
                  of the whole causal square, (Σ Tᵢ)²/2 pairs, which packing paid before blocks
                  were skipped by segment ranges
Part 2 ("sweep"): varlen at the same total tokens for 1, 4, 16, 64, 256, 1024 documents:
time against the number of documents, beside Σ Tᵢ² (the pairs the documents need).

Memory is the compiled program's temp bytes (`memory_analysis()`); a program whose temp bytes
pass --time-limit-gib (default 4 on CPU) is compiled but not run ("not timed"). Writes
varlen_[<tag>_]<backend>_<date>.csv and .png into --out (default bench/out/, untracked;
`--out bench/results` for a run to commit), one progress line per finished row with an ETA.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

import chunkattn  # noqa: E402

COLUMNS = [
    "part", "impl", "implementation", "backend", "device", "device_model", "jax_version", "date",
    "num_docs", "total_tokens", "max_len", "causal_pairs", "layout", "heads",
    "head_dim", "dtype", "fwd_ms", "fwdbwd_ms", "fwdbwd_vs_varlen", "fwd_temp_bytes",
    "fwdbwd_temp_bytes", "status",
]  # fmt: skip

COMPARE = ("varlen", "segments", "padded", "dense_segments", "whole_square")
LABELS = {
    "varlen": "varlen_attention (packed)",
    "segments": "dot_product_attention(segment_ids), packed",
    "padded": "padded to the longest document",
    "dense_segments": "dense XLA with a segment mask",
    "whole_square": "whole causal square (no segment skipping)",
}


def document_lengths(total: int, num_docs: int, seed: int) -> np.ndarray:
    """num_docs random lengths ≥ 1 summing to total: cut points drawn uniformly without repeat."""
    if not 1 <= num_docs <= total:
        raise ValueError(f"need 1 <= num_docs <= total tokens, got {num_docs=} {total=}")
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, total), num_docs - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def _causal_pairs(lengths) -> int:
    return int(sum(int(t) * (int(t) + 1) // 2 for t in lengths))


def _programs(impl: str, lengths: np.ndarray, implementation: str | None):
    """(f(q, k, v) -> out, the leading dims of the q/k/v/out it takes).

    Every program but "padded" takes the packed [total, N, H] arrays; "padded" takes the
    documents already padded to the longest, [num_docs, max_len, N, H] (as a padded pipeline
    holds them), so only attention is timed.
    """
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total, longest, n = int(cu[-1]), int(lengths.max()), len(lengths)
    seg = jnp.asarray(np.repeat(np.arange(n, dtype=np.int32), lengths))
    opts = dict(is_causal=True, implementation=implementation)
    packed = (total,)

    def varlen(q, k, v):
        return chunkattn.varlen_attention(
            q, k, v, cu, cu, max_seqlen_q=longest, max_seqlen_k=longest, **opts
        )

    def segments(q, k, v):
        return chunkattn.dot_product_attention(q, k, v, segment_ids=seg, **opts)

    def dense_segments(q, k, v):
        return chunkattn.dot_product_attention(
            q, k, v, segment_ids=seg, is_causal=True, implementation="xla"
        )

    def whole_square(q, k, v):
        return chunkattn.dot_product_attention(q, k, v, **opts)

    lens = jnp.asarray(lengths, jnp.int32)

    def padded(q, k, v):
        return chunkattn.dot_product_attention(
            q, k, v, query_seq_lengths=lens, key_value_seq_lengths=lens, **opts
        )

    return {
        "varlen": (varlen, packed),
        "segments": (segments, packed),
        "dense_segments": (dense_segments, packed),
        "whole_square": (whole_square, packed),
        "padded": (padded, (n, longest)),
    }[impl]


def measure(impl, lengths, args, part: str, dtype, env) -> dict:
    """One row: compiled temp bytes of forward and forward+backward, and their median times."""
    total = int(lengths.sum())
    fn, lead = _programs(impl, lengths, args.implementation)
    row = dict(
        env,
        part=part,
        impl=impl,
        implementation="xla" if impl == "dense_segments" else args.implementation or "auto",
        num_docs=len(lengths),
        total_tokens=total,
        max_len=int(lengths.max()),
        causal_pairs=_causal_pairs(lengths),
        layout=f"[{', '.join(map(str, lead))}, N, H]",
        heads=args.heads,
        head_dim=args.head_dim,
        dtype=dtype.name,
        status="ok",
    )
    keys = jax.random.split(jax.random.PRNGKey(total + len(lengths)), 4)
    shape = (*lead, args.heads, args.head_dim)
    q, k, v, do = (jax.random.normal(x, shape, dtype) for x in keys)
    fwd = jax.jit(lambda q, k, v, do: fn(q, k, v))
    fwdbwd = jax.jit(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do))
    limit = args.time_limit_gib * 2**30 if args.time_limit_gib else None
    try:
        for name, program in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            compiled = program.lower(q, k, v, do).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            row[f"{name}_temp_bytes"] = temp
            if limit is not None and temp > limit:
                limit_text = common.format_bytes(limit)
                row["status"] = f"not timed: temp {common.format_bytes(temp)} > {limit_text} limit"
                continue
            sec = common.median_seconds(compiled, [(q, k, v, do)], args.reps, args.warmup)
            row[f"{name}_ms"] = sec * 1e3
    except Exception as e:  # noqa: BLE001 - an OOM or an unsupported request is a result
        row["status"] = common.status_of(e)
    return row


def _ms(x) -> str:
    return f"{x:10.1f}" if x is not None else f"{'-':>10}"


def plot(rows: list[dict], path: pathlib.Path):
    """Left: the sweep, time against the number of documents beside Σ Tᵢ². Right: the
    comparison at 64 documents, forward+backward time with compiled temp memory."""
    from matplotlib.figure import Figure  # no pyplot: no global backend is set or changed

    fig = Figure(figsize=(13, 4.8))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    sweep = sorted((r for r in rows if r["part"] == "sweep"), key=lambda r: r["num_docs"])
    for key, name, marker in (("fwdbwd_ms", "forward+backward", "o"), ("fwd_ms", "forward", "s")):
        pts = [(r["num_docs"], r[key]) for r in sweep if r.get(key)]
        if pts:
            left.plot(*zip(*pts, strict=True), marker=marker, label=f"varlen_attention, {name}")
    timed = [r for r in sweep if r.get("fwdbwd_ms")]
    if timed:  # Σ Tᵢ², scaled to meet the first measured point
        r0 = timed[0]
        ideal = [
            (r["num_docs"], r0["fwdbwd_ms"] * r["causal_pairs"] / r0["causal_pairs"]) for r in sweep
        ]
        left.plot(*zip(*ideal, strict=True), "k:", label="∝ Σ Tᵢ² (pairs the documents need)")
    left.set(xscale="log", yscale="log", xlabel="documents (fixed total tokens)", ylabel="ms")
    if sweep:
        left.set_xticks([r["num_docs"] for r in sweep], [str(r["num_docs"]) for r in sweep])
        left.set_title(
            f"{common.format_tokens(sweep[0]['total_tokens'])} tokens, causal", fontsize=10
        )
    left.grid(True, which="major", alpha=0.3)
    left.legend(fontsize=8)

    comp = [r for r in rows if r["part"] == "compare"]
    names = [LABELS.get(r["impl"], r["impl"]) for r in comp]
    times = [r.get("fwdbwd_ms") or 0.0 for r in comp]
    ys = np.arange(len(comp))[::-1]
    right.barh(ys, times, color="tab:blue")
    right.set_yticks(ys, names, fontsize=8)
    right.set(xscale="log", xlabel="forward+backward ms (log)")
    top = max(times + [1.0])
    for y, r, t in zip(ys, comp, times, strict=True):
        mem = r.get("fwdbwd_temp_bytes")
        if t:
            text = f"{t:,.0f} ms" + (f", temp {common.format_bytes(mem)}" if mem else "")
        else:  # the status says why, with the temp bytes where they were the reason
            text = r["status"]
        right.text(t if t else 1.0, y, " " + text, va="center", fontsize=7)
    right.set_xlim(left=1.0, right=top * 10)
    if comp:
        c = comp[0]
        right.set_title(
            f"{c['num_docs']} documents, {common.format_tokens(c['total_tokens'])} tokens "
            f"(longest {c['max_len']}), causal",
            fontsize=10,
        )
    r0 = rows[0]
    fig.suptitle(
        f"packed variable-length attention, {common.device_title(r0)}, jax {r0['jax_version']}, "
        f"{r0['date']}: N={r0['heads']}, H={r0['head_dim']}, {r0['dtype']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def table(rows: list[dict]) -> str:
    lines = [f"{'part':>8} {'impl':>15} {'docs':>5} {'fwd ms':>10} {'fwd+bwd ms':>10} "
             f"{'vs varlen':>9} {'fwd+bwd temp':>12}  status"]  # fmt: skip
    for r in rows:
        ratio = r.get("fwdbwd_vs_varlen")
        temp = r.get("fwdbwd_temp_bytes")
        lines.append(
            f"{r['part']:>8} {r['impl']:>15} {r['num_docs']:>5} {_ms(r.get('fwd_ms'))} "
            f"{_ms(r.get('fwdbwd_ms'))} {f'{ratio:.2f}' if ratio else '-':>9} "
            f"{common.format_bytes(temp) if temp is not None else '-':>12}  {r['status']}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4k tokens, 16 documents: CPU seconds")
    p.add_argument("--tokens", type=int, default=None, help="total tokens (default 16384)")
    p.add_argument("--docs", type=int, default=None, help="documents compared (default 64)")
    p.add_argument("--sweep", type=int, nargs="*", default=None, help="document counts")
    p.add_argument("--impls", nargs="*", default=list(COMPARE), choices=COMPARE)
    p.add_argument("--implementation", default=None, help="chunkattn's (default: automatic)")
    p.add_argument("--heads", type=int, default=None, help="default 4 (CPU) / 16 (GPU)")
    p.add_argument("--head-dim", type=int, default=None, help="default 64 (CPU) / 128 (GPU)")
    p.add_argument("--dtype", default=None, help="default float32 (CPU) / bfloat16 (GPU)")
    p.add_argument("--reps", type=int, default=None, help="timed runs (default 2 CPU, 5 GPU)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed runs first (default 0 CPU, 2 GPU)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--time-limit-gib",
        type=float,
        default=None,
        help="compile, but do not run, programs with more temp memory (default 4 CPU, none GPU)",
    )
    p.add_argument("--tag", type=common.tag_arg, default="")
    common.add_out_arg(p)
    p.add_argument("--replot", metavar="CSV", help="redraw the plot of a results CSV beside it")
    a = p.parse_args(argv)
    if a.replot:
        path = pathlib.Path(a.replot)
        plot(common.read_rows(path), path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
        return 0
    env = common.environment()
    gpu = env["backend"] == "gpu"
    a.tokens = a.tokens or (4096 if a.quick else 16384)
    a.docs = a.docs or (16 if a.quick else 64)
    if a.sweep is None:
        a.sweep = [1, 4, 16, 64] if a.quick else [1, 4, 16, 64, 256, 1024]
    a.heads = a.heads or (16 if gpu else 4)
    a.head_dim = a.head_dim or (128 if gpu else 64)
    # Programs are compiled before they are timed, so on CPU a warm-up run only costs time: the
    # slowest rows (the padded batch, the whole square) take ~30 s a run on 2 cores.
    a.reps = a.reps or (5 if gpu else 2)
    a.warmup = (2 if gpu else 0) if a.warmup is None else a.warmup
    if a.time_limit_gib is None and not gpu:
        a.time_limit_gib = 4.0
    for n in [a.docs, *a.sweep]:
        if not 1 <= n <= a.tokens:
            p.error(f"document counts must be in [1, --tokens={a.tokens}], got {n}")
    dtype = jnp.dtype(a.dtype or ("bfloat16" if gpu else "float32"))

    plan = [("compare", impl, a.docs) for impl in a.impls]
    plan += [("sweep", "varlen", n) for n in a.sweep]
    progress = common.Progress(len(plan))
    rows = []
    for part, impl, n in plan:
        lengths = document_lengths(a.tokens, n, a.seed)
        row = measure(impl, lengths, a, part, dtype, env)
        rows.append(row)
        progress.row(
            f"{part:>7} {impl:>14} docs={n:<5} longest={row['max_len']:<6} fwd "
            f"{_ms(row.get('fwd_ms'))} ms  fwd+bwd {_ms(row.get('fwdbwd_ms'))} ms  temp "
            f"{common.format_bytes(row.get('fwdbwd_temp_bytes') or 0):>9}  {row['status']}"
        )
    base = next((r for r in rows if r["part"] == "compare" and r["impl"] == "varlen"), None)
    for r in rows:
        if r["part"] == "compare" and base and base.get("fwdbwd_ms") and r.get("fwdbwd_ms"):
            r["fwdbwd_vs_varlen"] = r["fwdbwd_ms"] / base["fwdbwd_ms"]
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / common.result_stem("varlen", a.tag, env)
    with open(f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, pathlib.Path(f"{stem}.png"))
    print(table(rows))
    print(f"wrote {stem}.csv and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
