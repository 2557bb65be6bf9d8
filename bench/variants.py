"""Softmax against the linear-time variants: the GPT's validation loss, training throughput,
and speed and memory against sequence length.

Part 1, the race: trains the same small GPT (same seed, same batches, same number of steps)
once per attention kind through the training CLI's entry point (`chunkattn.train.main`, in this
process), then scores each final checkpoint on --val-batches held-out batches: the CLI's own
`val_loss` is one batch of B·T bytes, too noisy to rank models that differ by a few hundredths
of a nat. Runs are interleaved (seed 0 of every kind, then seed 1, ...) so that other load on the
machine spreads over all kinds; the 1-minute load average before each run is recorded beside its
throughput. Kinds: softmax (chunked), linear, delta (DPFP), Caterpillar, gated delta (Gated
DeltaNet) and the hybrid (--hybrid-pattern, default gs: Gated DeltaNet then softmax).

Part 2, speed against T: the same model's jitted training step (forward, backward, AdamW) at
batch 1 and each --speed-seq-lens, per kind: training tokens/s (median of --speed-reps after a
warm-up) and the step's compiled temporary memory (`memory_analysis()`, parameters and
optimizer state excluded), T interleaved over the kinds.

    .venv/bin/python bench/variants.py          # a few minutes on 2 CPU cores: 1 seed, T <= 2k
    .venv/bin/python bench/variants.py --full   # README's table: 3 seeds, 32 batches, T to 16k
    .venv/bin/python bench/variants.py --steps 1000 --attention chunked delta --seeds 0

Both train at T=128, B=8, 2 layers, D=64, 4 heads, 200 steps. Writes variants_[<tag>_]<backend>_
<date>.csv and .png (the race) and variants_speed_[<tag>_]<backend>_<date>.csv and .png (speed
and memory against T) into --out (default bench/out/, untracked; `--out bench/results` for a run
to commit), one progress line per finished run or measurement with an ETA.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import shutil
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

from chunkattn import train  # noqa: E402

KINDS = ("chunked", "linear", "delta", "caterpillar", "gated_delta", "hybrid")
# The default run (a few minutes) and --full (README's table); explicit options win over both.
QUICK = dict(steps=200, seeds=[0], val_batches=8, speed_seq_lens=[256, 2048])
FULL = dict(steps=200, seeds=[0, 1, 2], val_batches=32, speed_seq_lens=[256, 1024, 4096, 16384])
COLUMNS = [
    "attention", "variant_config", "seed", "steps", "seq_len", "batch", "layers", "heads", "dim",
    "params", "val_loss", "heldout_loss", "val_batches", "train_loss", "tokens_per_s_last_log",
    "tokens_per_s_median", "load_avg_1m", "backend", "device", "device_model", "cpu_count",
    "jax_version", "date",
]  # fmt: skip
SPEED_COLUMNS = [
    "attention", "variant_config", "seq_len", "batch", "layers", "heads", "dim", "params",
    "step_ms", "tokens_per_s", "temp_bytes", "reps", "load_avg_1m", "backend", "device",
    "device_model", "cpu_count", "jax_version", "date",
]  # fmt: skip


def variant_flags(kind: str, args) -> list[str]:
    """The CLI knobs of one attention kind (the CLI refuses a knob given to another kind)."""
    if kind == "delta":
        return ["--dpfp-nu", str(args.dpfp_nu)]
    if kind == "caterpillar":
        return [
            "--caterpillar-heads",
            str(args.caterpillar_heads),
            "--caterpillar-length",
            str(args.caterpillar_length),
        ]
    if kind == "hybrid":
        return ["--hybrid-pattern", args.hybrid_pattern]
    return []


def cli_args(kind: str, seed: int, run_dir: pathlib.Path, args) -> list[str]:
    argv = [
        "--attention", kind, "--seed", str(seed), "--steps", str(args.steps),
        "--seq-len", str(args.seq_len), "--batch-size", str(args.batch), "--layers",
        str(args.layers), "--heads", str(args.heads), "--dim", str(args.dim),
        "--log-every", str(args.log_every), "--eval-every", str(args.eval_every),
        "--ckpt-every", str(args.steps), "--sample", "0", "--out", str(run_dir),
    ]  # fmt: skip
    if args.data:
        argv += ["--data", args.data]
    return argv + variant_flags(kind, args)


def count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def heldout_loss(
    argv: list[str], run_dir: pathlib.Path, val: np.ndarray, n: int
) -> tuple[float, int]:
    """(Mean loss of the run's final checkpoint over n validation batches (batch i of seed+1),
    the model's parameter count).

    Batch 0 is the one the CLI logs as `val_loss`, so with n=1 the two agree exactly.
    """
    a = train.parse_args(argv)
    _, _, _, params, tx, _, _, eval_loss = train.build(a)
    params, _, step = train.restore(run_dir, params, tx.init(params))
    assert step == a.steps, (step, a.steps)  # the run finished and saved its last step
    losses = [
        float(eval_loss(params, train.batch_at(val, a.seed + 1, i, a.batch_size, a.seq_len)))
        for i in range(n)
    ]
    return statistics.fmean(losses), count_params(params)


def run_one(kind: str, seed: int, args, val: np.ndarray, runs: pathlib.Path) -> dict:
    run_dir = runs / f"{kind}_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale checkpoint would be restored instead
    argv = cli_args(kind, seed, run_dir, args)
    load = os.getloadavg()[0]
    rc = train.main(argv)
    if rc != 0:
        raise RuntimeError(f"chunkattn-train {' '.join(argv)} exited {rc}")
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "val_loss" in m]
    # The first log interval includes compilation: steady-state throughput is the rest.
    steady = [m["tokens_per_s"] for m in metrics[1:]] or [metrics[0]["tokens_per_s"]]
    env = common.environment()
    heldout, params = heldout_loss(argv, run_dir, val, args.val_batches)
    return dict(
        env,
        attention=kind,
        variant_config=" ".join(variant_flags(kind, args)),
        seed=seed,
        steps=args.steps,
        seq_len=args.seq_len,
        batch=args.batch,
        layers=args.layers,
        heads=args.heads,
        dim=args.dim,
        params=params,
        val_loss=round(evals[-1]["val_loss"], 4),
        heldout_loss=round(heldout, 4),
        val_batches=args.val_batches,
        train_loss=round(metrics[-1]["loss"], 4),
        tokens_per_s_last_log=round(metrics[-1]["tokens_per_s"]),
        tokens_per_s_median=round(statistics.median(steady)),
        load_avg_1m=round(load, 2),
        cpu_count=os.cpu_count(),
        curve=[(m["step"], m["val_loss"]) for m in evals],
    )


def speed_row(kind: str, seq_len: int, args) -> dict:
    """Training tokens/s and compiled temp memory of one kind's training step at batch 1."""
    argv = cli_args(kind, 0, pathlib.Path("unused"), args)
    argv += ["--seq-len", str(seq_len), "--batch-size", "1"]  # the later flag wins
    a = train.parse_args(argv)
    _, _, _, params, tx, _, train_step, _ = train.build(a)
    opt_state = tx.init(params)
    rng = np.random.default_rng(seq_len)
    batch = jnp.asarray(rng.integers(0, 256, (1, seq_len + 1)), jnp.int32)
    load = os.getloadavg()[0]
    compiled = train_step.lower(params, opt_state, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    seconds = common.median_seconds(
        compiled, [(params, opt_state, batch)], args.speed_reps, warmup=1
    )
    return dict(
        common.environment(),
        attention=kind,
        variant_config=" ".join(variant_flags(kind, args)),
        seq_len=seq_len,
        batch=1,
        layers=args.layers,
        heads=args.heads,
        dim=args.dim,
        params=count_params(params),
        step_ms=round(seconds * 1e3, 2),
        tokens_per_s=round(seq_len / seconds),
        temp_bytes=temp,
        reps=args.speed_reps,
        load_avg_1m=round(load, 2),
        cpu_count=os.cpu_count(),
    )


def summary(rows: list[dict], speed: list[dict] | None = None) -> str:
    """Per kind: parameters, mean ± sample std over seeds of the held-out loss, median
    tokens/s, and at the longest speed T its training tokens/s and step temp memory."""
    top = max((r["seq_len"] for r in speed or []), default=None)
    at = f" at T={top}" if top else ""
    lines = [
        f"{'attention':>12} {'params':>8} {'seeds':>5} {'heldout loss':>18} {'tokens/s':>10}"
        + (f" {'tokens/s' + at:>16} {'temp MiB' + at:>16}" if top else "")
    ]
    for kind in dict.fromkeys(r["attention"] for r in rows):
        rs = [r for r in rows if r["attention"] == kind]
        losses = [r["heldout_loss"] for r in rs]
        spread = statistics.stdev(losses) if len(losses) > 1 else math.nan
        tps = statistics.median(r["tokens_per_s_median"] for r in rs)
        mean = statistics.fmean(losses)
        line = f"{kind:>12} {rs[0]['params']:>8,} {len(rs):>5} {mean:>10.4f} ± {spread:.4f}"
        line += f" {tps:>10,.0f}"
        long = [r for r in speed or [] if r["attention"] == kind and r["seq_len"] == top]
        if long:
            line += f" {long[0]['tokens_per_s']:>16,} {long[0]['temp_bytes'] / 2**20:>16,.1f}"
        lines.append(line)
    return "\n".join(lines)


def kind_label(kind: str, rows: list[dict]) -> str:
    """Legend name of an attention kind with its knobs, e.g. "Caterpillar (CH=4, CL=16)"."""
    name = {
        "chunked": "softmax (chunkattn, chunked)",
        "linear": "linear attention",
        "gated_delta": "gated delta rule (Gated DeltaNet)",
    }.get(kind)
    if name:
        return name
    flags = next((r["variant_config"] for r in rows if r["attention"] == kind), "").split()
    knobs = dict(zip(flags[::2], flags[1::2], strict=False))
    short = {"--dpfp-nu": "DPFP ν", "--caterpillar-heads": "CH", "--caterpillar-length": "CL"}
    short["--hybrid-pattern"] = "layers"
    config = ", ".join(f"{short.get(f, f)}={x}" for f, x in knobs.items())
    name = {"delta": "delta rule", "caterpillar": "Caterpillar", "hybrid": "hybrid"}.get(kind, kind)
    return f"{name} ({config})" if config else name


def plot(rows: list[dict], path: pathlib.Path):
    """Validation curves and throughput per attention kind; returns the saved Figure."""
    from matplotlib.figure import Figure  # no pyplot: no global backend is set or changed

    kinds = list(dict.fromkeys(r["attention"] for r in rows))
    fig = Figure(figsize=(12, 4.5))
    ax0, ax1 = fig.subplots(1, 2)
    for n, kind in enumerate(kinds):
        curves = [dict(r["curve"]) for r in rows if r["attention"] == kind]
        steps = sorted(curves[0])
        mean = [statistics.fmean(c[s] for c in curves) for s in steps]
        ax0.plot(steps, mean, color=f"C{n}", marker=".", label=kind_label(kind, rows))
    ax0.set_xlabel("step")
    ax0.set_ylabel("validation loss (nats/byte)")
    seeds = len(set(r["seed"] for r in rows))
    ax0.set_title(f"CLI val_loss, mean of {seeds} seed{'s' if seeds > 1 else ''}", fontsize=9)
    ax0.grid(alpha=0.3)
    ax0.legend(fontsize=8)
    tps = [
        statistics.median(r["tokens_per_s_median"] for r in rows if r["attention"] == k)
        for k in kinds
    ]
    held = [statistics.fmean(r["heldout_loss"] for r in rows if r["attention"] == k) for k in kinds]
    ax1.bar(range(len(kinds)), tps, color=[f"C{n}" for n in range(len(kinds))])
    ax1.set_xticks(range(len(kinds)))
    names = [kind_label(k, rows).replace(" (", "\n(") for k in kinds]
    ax1.set_xticklabels(names, fontsize=7, rotation=20, ha="right", rotation_mode="anchor")
    for x, (t, h) in enumerate(zip(tps, held, strict=True)):
        ax1.text(x, t, f"held-out {h:.3f}", ha="center", va="bottom", fontsize=8)
    ax1.set_ylabel("training tokens/s (median)")
    ax1.yaxis.set_major_formatter("{x:,.0f}")
    ax1.grid(alpha=0.3, axis="y")
    r0 = rows[0]
    fig.suptitle(
        f"GPT {r0['layers']} layers, D={r0['dim']}, {r0['heads']} heads, T={r0['seq_len']}, "
        f"B={r0['batch']}, {r0['steps']} steps; {common.device_title(r0)}, "
        f"jax {r0['jax_version']}, {r0['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def plot_speed(rows: list[dict], path: pathlib.Path):
    """Training tokens/s and the step's compiled temp memory against T, per kind."""
    from matplotlib.figure import Figure

    kinds = list(dict.fromkeys(r["attention"] for r in rows))
    fig = Figure(figsize=(11, 4))
    ax0, ax1 = fig.subplots(1, 2)
    lens = [r["seq_len"] for r in rows]
    for n, kind in enumerate(kinds):
        rs = sorted((r for r in rows if r["attention"] == kind), key=lambda r: r["seq_len"])
        t = [r["seq_len"] for r in rs]
        style = dict(color=f"C{n}", marker="o", label=kind_label(kind, rows))
        ax0.plot(t, [r["tokens_per_s"] for r in rs], **style)
        ax1.plot(t, [r["temp_bytes"] for r in rs], **style)
    for ax in (ax0, ax1):
        common.tokens_axis(ax, lens)
        ax.set_xlabel("sequence length T (batch 1)")
        ax.grid(alpha=0.3)
    ax0.set_yscale("log")
    ax0.yaxis.set_major_formatter("{x:,.0f}")
    ax0.yaxis.set_minor_formatter("{x:,.0f}")
    ax0.set_ylabel("training tokens/s (fwd + bwd + AdamW)")
    ax0.legend(fontsize=8)
    common.memory_axis(ax1, [r["temp_bytes"] for r in rows])
    ax1.set_ylabel("training step compiled temp memory")
    r0 = rows[0]
    fig.suptitle(
        f"GPT {r0['layers']} layers, D={r0['dim']}, {r0['heads']} heads, training step at batch "
        f"1, median of {r0['reps']}; {common.device_title(r0)}, jax {r0['jax_version']}, "
        f"{r0['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with --steps, --seeds and --val-batches from --full or the 2-minute default."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attention", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument(
        "--full",
        action="store_true",
        help=f"README's table: {FULL['steps']} steps, seeds {FULL['seeds']}, "
        f"{FULL['val_batches']} held-out batches (default: {QUICK['steps']} steps, seeds "
        f"{QUICK['seeds']}, {QUICK['val_batches']} batches, about 2 minutes on 2 CPU cores)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dpfp-nu", type=int, default=1)
    p.add_argument("--caterpillar-heads", type=int, default=4)
    p.add_argument("--caterpillar-length", type=int, default=16)
    p.add_argument("--hybrid-pattern", default="gs", help="the hybrid's layers (g/s letters)")
    p.add_argument(
        "--speed-seq-lens",
        type=int,
        nargs="*",
        default=None,
        help=f"T of the speed/memory part, batch 1 (default {QUICK['speed_seq_lens']}, --full "
        f"{FULL['speed_seq_lens']}; none given skips the part)",
    )
    p.add_argument("--speed-reps", type=int, default=3, help="timed training steps per T")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--val-batches", type=int, default=None, help="held-out batches scored per run")
    p.add_argument("--data", default=None, help="corpus (default: the CLI's, Python's stdlib)")
    p.add_argument("--runs", default=None, help="keep the runs here (default: a temp folder)")
    common.add_out_arg(p)
    p.add_argument("--tag", type=common.tag_arg, default="")
    args = p.parse_args(argv)
    for name, value in (FULL if args.full else QUICK).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "log_every", "eval_every", "val_batches", "speed_reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _, val = train.load_corpus(args.data)
    rows = []
    progress = common.Progress(len(args.seeds) * len(args.attention))
    with tempfile.TemporaryDirectory() as tmp:
        runs = pathlib.Path(args.runs or tmp)
        for seed in args.seeds:
            for kind in args.attention:
                row = run_one(kind, seed, args, val, runs)
                progress.row(
                    f"{kind:>12} seed {seed}: held-out loss {row['heldout_loss']:.4f} "
                    f"(CLI val {row['val_loss']:.4f}), {row['tokens_per_s_median']:,} tok/s, "
                    f"load {row['load_avg_1m']}"
                )
                rows.append(row)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / common.result_stem("variants", args.tag, common.environment())
    with open(f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, pathlib.Path(f"{stem}.png"))
    print(f"wrote {stem}.csv and {stem}.png")
    speed = []
    if args.speed_seq_lens:
        progress = common.Progress(len(args.speed_seq_lens) * len(args.attention))
        for seq_len in args.speed_seq_lens:
            for kind in args.attention:
                row = speed_row(kind, seq_len, args)
                progress.row(
                    f"{kind:>12} T={seq_len}: {row['tokens_per_s']:,} tok/s, temp "
                    f"{common.format_bytes(row['temp_bytes'])}, load {row['load_avg_1m']}"
                )
                speed.append(row)
        stem = out / common.result_stem("variants_speed", args.tag, common.environment())
        with open(f"{stem}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=SPEED_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(speed)
        plot_speed(speed, pathlib.Path(f"{stem}.png"))
        print(f"wrote {stem}.csv and {stem}.png")
    print(summary(rows, speed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
