"""A decode step (one new token against a KV cache): time and cache bandwidth against cache length.

    .venv/bin/python bench/decode.py                      # cache lengths 4k..128k, filled to 3/4
    .venv/bin/python bench/decode.py --lengths 4096 --reps 3 --out /tmp/x

A decode step reads the filled part of the cache once, so it is memory-bound: the figure of
merit is the bytes of K and V read per second. Compared in one run, all jitted with the cache
length traced (one compilation for every fill):
  decode      `chunkattn.decode.decode_attention` (the cache split into chunks, summarised in
              parallel per wave and merged by log-sum-exp)
  chunked     `chunkattn.dot_product_attention(implementation="chunked")` with q_offset and
              key_value_seq_lengths (a sequential loop over the filled chunks)
  pallas      the same with implementation="pallas" (GPU only)
  dense_xla   `jax.nn.dot_product_attention` over the whole cache with a length mask
Writes decode_[<tag>_]<backend>_<date>.csv and .png into --out (default bench/out/, untracked;
`--out bench/results` for a run to commit), one progress line per finished row with an ETA.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

import chunkattn  # noqa: E402
from chunkattn.decode import decode_attention  # noqa: E402

FIELDS = [
    "impl",
    "backend",
    "device",
    "device_model",
    "jax_version",
    "date",
    "cache_len",
    "filled",
    "batch",
    "heads",
    "kv_heads",
    "head_dim",
    "dtype",
    "ms",
    "cache_gb_per_s",
    "vs_chunked",
    "status",
]


def _step_fns(backend: str) -> dict:
    def decode(q, k, v, n):
        return decode_attention(q, k, v, n)

    def chunkattn_impl(impl):
        def fn(q, k, v, n):
            return chunkattn.dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                q_offset=n - 1,
                key_value_seq_lengths=n,
                implementation=impl,
            )

        return fn

    def dense_xla(q, k, v, n):
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=n, implementation="xla")

    fns = {"decode": decode, "chunked": chunkattn_impl("chunked"), "dense_xla": dense_xla}
    if backend == "gpu":
        fns["pallas"] = chunkattn_impl("pallas")
    return fns


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    p.add_argument("--fill", type=float, default=0.75, help="filled fraction of the cache")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tag", type=common.tag_arg, default="")
    common.add_out_arg(p)
    a = p.parse_args(argv)
    if not 0.0 < a.fill <= 1.0:
        p.error(f"--fill must be in (0, 1], got {a.fill}")
    env = common.environment()
    dtype = jnp.dtype(a.dtype or ("bfloat16" if env["backend"] == "gpu" else "float32"))
    rows = []
    fns = _step_fns(env["backend"])
    progress = common.Progress(len(a.lengths) * len(fns))
    for cache_len in a.lengths:
        filled = max(1, int(cache_len * a.fill))
        keys = jax.random.split(jax.random.PRNGKey(cache_len), 3)
        q = jax.random.normal(keys[0], (a.batch, 1, a.heads, a.head_dim), dtype)
        k = jax.random.normal(keys[1], (a.batch, cache_len, a.kv_heads, a.head_dim), dtype)
        v = jax.random.normal(keys[2], (a.batch, cache_len, a.kv_heads, a.head_dim), dtype)
        n = jnp.full((a.batch,), filled, jnp.int32)
        read = 2 * a.batch * filled * a.kv_heads * a.head_dim * dtype.itemsize  # K and V
        results = {}
        for name, fn in fns.items():
            row = dict(
                env,
                impl=name,
                cache_len=cache_len,
                filled=filled,
                batch=a.batch,
                heads=a.heads,
                kv_heads=a.kv_heads,
                head_dim=a.head_dim,
                dtype=dtype.name,
                status="ok",
            )
            try:
                sec = common.median_seconds(jax.jit(fn), [(q, k, v, n)], a.reps)
                results[name] = sec
                row.update(ms=sec * 1e3, cache_gb_per_s=read / sec / 1e9)
            except Exception as e:  # noqa: BLE001 - recorded, e.g. an OOM of the dense path
                row["status"] = common.status_of(e)
            rows.append(row)
            progress.row(
                f"L={cache_len:>7} {name:>9} {row.get('ms', float('nan')):9.3f} ms "
                f"{row.get('cache_gb_per_s', float('nan')):8.2f} GB/s {row['status']}"
            )
        for row in rows[-len(results) :]:
            if "chunked" in results and row["impl"] in results:
                row["vs_chunked"] = results["chunked"] / results[row["impl"]]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = common.result_stem("decode", a.tag, env)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    _plot(rows, out / f"{stem}.png", env, a.fill)
    print(f"wrote {out / stem}.csv and .png")
    return 0


LABELS = {
    "decode": "chunkattn.decode_attention",
    "chunked": "chunkattn (chunked)",
    "pallas": "chunkattn (Pallas)",
    "dense_xla": "dense XLA (jax.nn)",
}


def _plot(rows, path, env, fill: float):
    """ms per step against the cache length, log-log; returns the saved Figure."""
    from matplotlib.figure import Figure  # no pyplot: no global backend is set or changed

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    lengths = []
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = [(r["cache_len"], r["ms"]) for r in rows if r["impl"] == impl and "ms" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=LABELS.get(impl, impl))
            lengths += [t for t, _ in pts]
    ax.set(yscale="log", xlabel=f"cache length L (tokens, filled {fill:.0%})", ylabel="ms per step")
    if lengths:
        common.tokens_axis(ax, lengths)
    r0 = rows[0]
    ax.set_title(
        f"decode step, {common.device_title(env)}: B={r0['batch']}, N={r0['heads']}, "
        f"K={r0['kv_heads']}, H={r0['head_dim']}, {r0['dtype']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


if __name__ == "__main__":
    sys.exit(main())
