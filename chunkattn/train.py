"""Train the small GPT with Optax from the command line (`chunkattn-train`).

Byte-level tokens (vocabulary 256). With no --data it trains on text found on every machine:
the source files of the Python standard library, split into train and validation by file,
deterministically. AdamW with warmup + cosine decay and global-norm clipping; a jitted step;
orbax checkpoints under --out (every --ckpt-every steps and at the end); --resume continues
from the last one with the same parameters, optimizer state, step and data order (batches are
a pure function of (seed, step)). Writes DIR/metrics.jsonl, DIR/loss.png and DIR/sample.txt.
Bad input gives a one-line error and exit status 2.

    chunkattn-train --steps 300 --seq-len 256 --out runs/gpt
    chunkattn-train --steps 600 --out runs/gpt --resume
    chunkattn-train --seq-len 16384 --dry-run --attention xla   # compiled memory of the step
    chunkattn-train --attention delta --dpfp-nu 2               # a linear-time variant
    chunkattn-train --attention caterpillar --caterpillar-heads 4 --caterpillar-length 32
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from chunkattn.models.gpt import ATTENTION, GPT, GPTConfig, generate

MAX_CORPUS_BYTES = 32 * 2**20
_DEFAULTS = GPTConfig()
# CLI knobs of the linear-time variants (GPTConfig fields) -> the --attention they belong to.
VARIANT_KNOBS = {
    "dpfp_nu": "delta",
    "caterpillar_heads": "caterpillar",
    "caterpillar_length": "caterpillar",
}


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


def load_corpus(path: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) uint8 byte arrays: every 20th file (sorted) is validation."""
    if path is None:
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    else:
        p = pathlib.Path(path)
        if not p.exists():
            raise UsageError(f"--data {path}: no such file or directory")
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        if not files:
            raise UsageError(f"--data {path}: no files in that folder")
    train, val, total = [], [], 0
    for i, f in enumerate(files):
        data = f.read_bytes()
        total += len(data)
        (val if len(files) > 1 and i % 20 == 19 else train).append(data)
        if total > MAX_CORPUS_BYTES:
            break
    join = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8)
    if not val:  # fewer than 20 files: the last 5 % of the text is validation
        data = join(train)
        cut = int(len(data) * 0.95)
        return data[:cut], data[cut:]
    return join(train), join(val)


def batch_at(data: np.ndarray, seed: int, step: int, batch: int, seq_len: int) -> np.ndarray:
    """Batch [B, T+1] of step `step`: a pure function of (seed, step), so resumes see the same."""
    if len(data) < seq_len + 2:
        raise UsageError(f"corpus of {len(data)} bytes is shorter than --seq-len {seq_len} + 2")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
    return np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="chunkattn-train", description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="a text file or a folder of text files")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="longest sequence the model allows (default: --seq-len)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000, help="total steps (a resume runs up to it)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--attention", default="chunked", help=f"one of {ATTENTION}")
    p.add_argument(
        "--dpfp-nu",
        type=int,
        default=None,
        help=f"--attention delta: DPFP ν, keys get 2·H·ν features (default {_DEFAULTS.dpfp_nu})",
    )
    p.add_argument(
        "--caterpillar-heads",
        type=int,
        default=None,
        help=f"--attention caterpillar: CH recurrent rows (default {_DEFAULTS.caterpillar_heads})",
    )
    p.add_argument(
        "--caterpillar-length",
        type=int,
        default=None,
        help="--attention caterpillar: CL, period and window "
        f"(default {_DEFAULTS.caterpillar_length})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/gpt")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--sample", type=int, default=200, help="bytes to generate at the end")
    p.add_argument(
        "--dry-run", action="store_true", help="print the train step's compiled memory and exit"
    )
    p.add_argument(
        "--mesh", default=None, help="data + sequence parallelism over the devices, e.g. dp=2,sp=4"
    )
    a = p.parse_args(argv)
    a.mesh_shape = parse_mesh(a.mesh)
    if a.attention not in ATTENTION:
        raise UsageError(
            f"--attention {a.attention!r}: unknown, choose from {', '.join(ATTENTION)}"
        )
    if a.mesh_shape and a.mesh_shape.get("sp", 1) > 1 and a.attention != "chunked":
        raise UsageError(  # the ring runs the chunked core; other layers would ignore the mesh
            f"--mesh {a.mesh}: sequence parallelism (sp > 1) runs ring attention on the chunked "
            f"core, use --attention chunked (got {a.attention})"
        )
    a.max_seq_len = a.max_seq_len or a.seq_len
    if a.seq_len > a.max_seq_len:
        raise UsageError(
            f"--seq-len {a.seq_len} is larger than the model allows (--max-seq-len {a.max_seq_len})"
        )
    for name in ("seq_len", "batch_size", "steps", "layers", "heads", "dim"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if a.dim % a.heads:
        raise UsageError(f"--dim {a.dim} must be divisible by --heads {a.heads}")
    for name, owner in VARIANT_KNOBS.items():
        value, flag = getattr(a, name), f"--{name.replace('_', '-')}"
        if value is None:
            setattr(a, name, getattr(_DEFAULTS, name))
        elif a.attention != owner:  # a knob that would be silently ignored is a mistake
            raise UsageError(f"{flag} applies to --attention {owner}, not {a.attention}")
        elif value < 1:
            raise UsageError(f"{flag} must be positive, got {value}")
    return a


def parse_mesh(text: str | None) -> dict[str, int] | None:
    """'dp=2,sp=4' -> {'dp': 2, 'sp': 4}; checked against the devices present."""
    if not text:
        return None
    try:
        shape = {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise UsageError(f"--mesh {text!r}: expected axis=size pairs such as dp=2,sp=4") from None
    if set(shape) - {"dp", "sp"} or any(v < 1 for v in shape.values()):
        raise UsageError(f"--mesh {text!r}: axes are dp and sp, sizes positive")
    if math.prod(shape.values()) != jax.device_count():
        raise UsageError(
            f"--mesh {text!r} needs {math.prod(shape.values())} devices, "
            f"{jax.device_count()} present"
        )
    return shape


def make_mesh(shape: dict[str, int] | None):
    if shape is None:
        return None
    names = tuple(shape)
    return jax.make_mesh(
        tuple(shape.values()), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names)
    )


def build(a):
    cfg = GPTConfig(
        max_seq_len=a.max_seq_len,
        num_layers=a.layers,
        num_heads=a.heads,
        dim=a.dim,
        attention=a.attention,
        **{name: getattr(a, name) for name in VARIANT_KNOBS},
    )
    mesh = make_mesh(a.mesh_shape)
    model = GPT(cfg, rngs=nnx.Rngs(a.seed), mesh=mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, a.lr, max(a.warmup, 1), max(a.steps, a.warmup + 1), end_value=a.lr * 0.1
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))

    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params, rest)(batch[:, :-1])  # (B, T, V)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return model, graphdef, rest, params, tx, schedule, train_step, jax.jit(loss_fn)


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save(out: pathlib.Path, step: int, params, opt_state) -> None:
    leaves = jax.tree_util.tree_leaves((params, opt_state))
    ckpt = _checkpointer()
    path = (out / "checkpoints" / f"step_{step:08d}").resolve()
    ckpt.save(path, {"leaves": leaves, "step": np.array(step, np.int64)}, force=True)
    ckpt.wait_until_finished()


def restore(out: pathlib.Path, params, opt_state):
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    if not ckpts:
        raise UsageError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    leaves, treedef = jax.tree_util.tree_flatten((params, opt_state))
    target = {"leaves": leaves, "step": np.array(0, np.int64)}
    try:
        got = _checkpointer().restore(ckpts[-1].resolve(), target)
        params, opt_state = jax.tree_util.tree_unflatten(treedef, list(got["leaves"]))
        return params, opt_state, int(got["step"])
    except Exception as e:  # noqa: BLE001 - a corrupt checkpoint is bad input
        raise UsageError(
            f"--resume: checkpoint {ckpts[-1]} is unreadable ({type(e).__name__})"
        ) from e


def plot_losses(out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    plt.figure(figsize=(6, 4))
    plt.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    val = [r for r in rows if "val_loss" in r]
    if val:
        plt.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    plt.xlabel("step")
    plt.ylabel("cross-entropy (nats/byte)")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.savefig(out / "loss.png", dpi=110)
    plt.close()


def run(a) -> int:
    train, val = load_corpus(a.data)
    model, graphdef, rest, params, tx, schedule, train_step, eval_loss = build(a)
    opt_state = tx.init(params)
    mesh = make_mesh(a.mesh_shape)
    if mesh is not None:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        data_sharding = NamedSharding(mesh, P("dp" if "dp" in mesh.shape else None, None))
    if a.dry_run:
        batch = jax.ShapeDtypeStruct((a.batch_size, a.seq_len + 1), jnp.int32)
        compiled = train_step.lower(params, opt_state, batch).compile()
        mem = compiled.memory_analysis()
        print(
            f"train step, attention={a.attention}, seq_len={a.seq_len}, batch={a.batch_size}: "
            f"compiled temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, arguments "
            f"{mem.argument_size_in_bytes / 2**20:.1f} MiB"
        )
        return 0
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    step = 0
    if a.resume:
        params, opt_state, step = restore(out, params, opt_state)
    metrics = open(out / "metrics.jsonl", "a" if a.resume else "w")
    t0, tokens = time.perf_counter(), 0
    while step < a.steps:
        batch = jnp.asarray(batch_at(train, a.seed, step, a.batch_size, a.seq_len))
        if mesh is not None:  # batch over "dp"; the sequence is split inside the attention
            batch = jax.device_put(batch, data_sharding)
        params, opt_state, loss = train_step(params, opt_state, batch)
        step += 1
        tokens += a.batch_size * a.seq_len
        if step % a.log_every == 0 or step == a.steps:
            loss = float(loss)
            tps = tokens / (time.perf_counter() - t0)
            row = {"step": step, "loss": loss, "lr": float(schedule(step)), "tokens_per_s": tps}
            if step % a.eval_every == 0 or step == a.steps:
                vb = jnp.asarray(batch_at(val, a.seed + 1, 0, a.batch_size, a.seq_len))
                row["val_loss"] = float(eval_loss(params, vb))
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            width = 30
            done = int(width * step / a.steps)
            print(
                f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{a.steps} loss {loss:.4f} "
                f"{tps:,.0f} tok/s",
                end="",
                file=sys.stderr,
                flush=True,
            )
            t0, tokens = time.perf_counter(), 0
            if not math.isfinite(loss):
                print(f"\nloss became {loss} at step {step}", file=sys.stderr)
                return 1
        if step % a.ckpt_every == 0 or step == a.steps:
            save(out, step, params, opt_state)
    print(file=sys.stderr)
    metrics.close()
    plot_losses(out)
    if a.sample > 0 and a.attention in ("linear", "delta", "caterpillar"):
        print(
            f"no sample: --attention {a.attention} has no KV cache for generate()", file=sys.stderr
        )
    elif a.sample > 0:
        trained = nnx.merge(graphdef, params, rest)
        if mesh is not None:  # decoding uses the KV cache, not the ring: a one-device copy
            trained = GPT(trained.cfg, rngs=nnx.Rngs(0))
            nnx.update(trained, params)
        prompt = jnp.asarray(val[: min(32, len(val))][None].astype(np.int32))
        n = min(a.sample, a.max_seq_len - prompt.shape[1])
        text = generate(
            trained, prompt, n, rng=jax.random.PRNGKey(a.seed), temperature=0.8, top_k=40
        )
        sample = bytes(np.asarray(text[0], np.uint8)).decode("utf-8", errors="replace")
        (out / "sample.txt").write_text(sample)
        print(sample)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except UsageError as e:
        print(f"chunkattn-train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
