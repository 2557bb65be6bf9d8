"""Train the small GPT with Optax from the command line (`chunkattn-train`).

Byte-level tokens (vocabulary 256). With no --data it trains on text found on every machine:
the source files of the Python standard library, split into train and validation by file,
deterministically. AdamW with warmup + cosine decay and global-norm clipping; a jitted step.

A run is one folder, --out: config.json (the options that define the run), checkpoints/ (an
Orbax CheckpointManager: atomic saves, so --resume always finds the newest complete one),
metrics.jsonl (one row per logged step, each step once), and at the end loss.png and sample.txt.

- Ctrl-C (SIGINT) or SIGTERM (preemption) ends the run after the current step: a checkpoint of
  that step is saved, the metrics flushed, exit status 130 or 143. A second signal stops at once;
  the save it cuts short is ignored on resume.
- --resume continues from the newest complete checkpoint with the same parameters, optimizer
  state, step and data order (batches are a pure function of (seed, step)), so N steps straight
  and k steps + --resume to N give bitwise the same losses and parameters on a CPU. Options not
  given take the run's saved values; a given one that defines the run (model, data, optimizer,
  seed) must match. --steps, --log-every, --eval-every, --ckpt-every, --keep-checkpoints,
  --sample and --mesh may change.
- The learning-rate schedule spans --schedule-steps (default: the first invocation's --steps),
  saved with the run; steps past it (a resume with a larger --steps) keep its final rate, --lr/10.
- A new run into an --out that holds one is refused unless --resume or --overwrite is given.
- Bad input gives one `chunkattn-train: error:` line and exit status 2.
- Progress: a tqdm bar on a terminal, plain lines every --log-every steps otherwise; a summary
  at the end.

    chunkattn-train --steps 300 --seq-len 256 --out runs/gpt
    chunkattn-train --out runs/gpt --resume                 # after Ctrl-C or preemption
    chunkattn-train --out runs/gpt --resume --steps 600     # train further, at the final rate
    chunkattn-train --seq-len 16384 --dry-run --attention xla   # compiled memory of the step
    chunkattn-train --attention delta --dpfp-nu 2               # a linear-time variant
    chunkattn-train --attention caterpillar --caterpillar-heads 4 --caterpillar-length 32
    chunkattn-train --sinks                                     # attention sinks (gpt-oss)
    chunkattn-train --attention gated_delta                     # Gated DeltaNet layers
    chunkattn-train --attention hybrid --hybrid-pattern gggs    # 3 Gated DeltaNet : 1 softmax
    chunkattn-train --mesh dp=2,sp=2,tp=2     # 8 devices: batch, sequence (ring) and heads split
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import sysconfig
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from chunkattn.models.gpt import ATTENTION, GPT, SINKS, GPTConfig, generate

MAX_CORPUS_BYTES = 32 * 2**20
_DEFAULTS = GPTConfig()
# CLI knobs of the linear-time variants (GPTConfig fields) -> the --attention they belong to.
VARIANT_KNOBS = {
    "dpfp_nu": "delta",
    "caterpillar_heads": "caterpillar",
    "caterpillar_length": "caterpillar",
    "hybrid_pattern": "hybrid",
}
NO_KV_CACHE = ("linear", "delta", "caterpillar")  # generate() needs a KV cache: no sample
SAMPLE_BYTES = 200
# Options that define a run: saved in config.json, fixed once the run starts.
RUN_OPTIONS = (
    "data",
    "seq_len",
    "max_seq_len",
    "batch_size",
    "lr",
    "warmup",
    "schedule_steps",
    "seed",
    "layers",
    "heads",
    "dim",
    "attention",
    "sinks",
    *VARIANT_KNOBS,
)
# Run options added after the first runs were saved: a config.json without one had this value.
ADDED_OPTIONS = {"sinks": False, "hybrid_pattern": _DEFAULTS.hybrid_pattern}
# Saved too, but a --resume may change them. --mesh describes the machine and is not saved.
RESUME_OPTIONS = ("steps", "log_every", "eval_every", "ckpt_every", "keep_checkpoints", "sample")
RUN_FILES = ("config.json", "metrics.jsonl", "loss.png", "sample.txt")  # and checkpoints/
# --mesh: data (batch), sequence (ring attention) and tensor (heads, MLP columns) parallelism.
MESH_AXES = ("dp", "sp", "tp")


class UsageError(Exception):
    """Bad input: each line of the message is reported as one error line, exit status 2."""


class _StopNow(BaseException):
    """A second SIGINT/SIGTERM: stop without finishing the save in progress."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
        try:
            data = f.read_bytes()
        except OSError as e:
            raise UsageError(f"--data {path}: cannot read {f} ({e.strerror or e})") from None
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


def check_corpus(a, train: np.ndarray, val: np.ndarray) -> None:
    """Each part must hold one batch of distinct text: batch_size · (seq_len + 1) bytes."""
    where = f"--data {a.data}" if a.data else "the default corpus"
    if len(train) + len(val) == 0:
        raise UsageError(f"{where}: no text, the files are empty")
    need = a.batch_size * (a.seq_len + 1)
    for part, data in (("training", train), ("validation", val)):
        if len(data) < need:
            raise UsageError(
                f"{where}: {len(data):,} bytes of {part} text, less than one batch "
                f"(--batch-size {a.batch_size} x (--seq-len {a.seq_len} + 1) = {need:,} bytes)"
            )


def batch_at(data: np.ndarray, seed: int, step: int, batch: int, seq_len: int) -> np.ndarray:
    """Batch [B, T+1] of step `step`: a pure function of (seed, step), so resumes see the same."""
    if len(data) < seq_len + 2:
        raise UsageError(f"corpus of {len(data)} bytes is shorter than --seq-len {seq_len} + 2")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
    return np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage too: one line instead
        raise UsageError(message)


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (options defaulting to None say it in words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        if action.default is False:
            return text + " (default: off)"
        return text + " (default: %(default)s)"


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="chunkattn-train",
        description=__doc__.splitlines()[0],
        formatter_class=_HelpFormatter,
    )
    add = p.add_argument
    add(
        "--data",
        metavar="PATH",
        default=None,
        help="a text file or a folder of text files "
        "(default: the Python standard library's sources)",
    )
    add("--seq-len", type=int, metavar="N", default=256, help="bytes per training sequence")
    add(
        "--max-seq-len",
        type=int,
        metavar="N",
        default=None,
        help="longest sequence the model allows (default: --seq-len)",
    )
    add("--batch-size", type=int, metavar="N", default=16, help="sequences per step")
    add(
        "--steps",
        type=int,
        metavar="N",
        default=1000,
        help="train up to this step (a resume may raise it)",
    )
    add(
        "--schedule-steps",
        type=int,
        metavar="N",
        default=None,
        help="length of the warmup + cosine learning-rate schedule; later steps keep its final "
        "rate, --lr/10 (default: --steps of the run's first invocation)",
    )
    add("--lr", type=float, metavar="LR", default=1e-3, help="peak learning rate of AdamW")
    add(
        "--warmup", type=int, metavar="N", default=100, help="steps of linear warmup from 0 to --lr"
    )
    add("--layers", type=int, metavar="N", default=4, help="transformer blocks")
    add("--heads", type=int, metavar="N", default=4, help="attention heads per block")
    add("--dim", type=int, metavar="N", default=256, help="model width")
    add(
        "--attention",
        metavar="NAME",
        default="chunked",
        help=f"attention, one of {', '.join(ATTENTION)}",
    )
    add(
        "--sinks",
        action="store_true",
        help="attention sinks (gpt-oss): every layer learns one logit per head that joins each "
        f"softmax's denominator; --attention {', '.join(SINKS)}",
    )
    add(
        "--dpfp-nu",
        type=int,
        metavar="N",
        default=None,
        help=f"--attention delta: DPFP ν, keys get 2·H·ν features (default: {_DEFAULTS.dpfp_nu})",
    )
    add(
        "--caterpillar-heads",
        type=int,
        metavar="N",
        default=None,
        help=f"--attention caterpillar: CH recurrent rows (default: {_DEFAULTS.caterpillar_heads})",
    )
    add(
        "--caterpillar-length",
        type=int,
        metavar="N",
        default=None,
        help="--attention caterpillar: CL, period and window "
        f"(default: {_DEFAULTS.caterpillar_length})",
    )
    add(
        "--hybrid-pattern",
        metavar="LETTERS",
        default=None,
        help="--attention hybrid: layer i is LETTERS[i %% len], g = Gated DeltaNet, s = softmax "
        f"(chunked), e.g. gggs (default: {_DEFAULTS.hybrid_pattern})",
    )
    add(
        "--seed",
        type=int,
        metavar="N",
        default=0,
        help="seed of the initial parameters and the data order",
    )
    add(
        "--out",
        metavar="DIR",
        default="runs/gpt",
        help="the run's folder: config.json, checkpoints/, metrics.jsonl, loss.png, sample.txt",
    )
    add(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest complete checkpoint; options not given "
        "take the run's values, and only --steps, --log-every, --eval-every, --ckpt-every, "
        "--keep-checkpoints, --sample and --mesh may differ from them",
    )
    add(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (its config, checkpoints, metrics, plot and sample)",
    )
    add("--eval-every", type=int, metavar="N", default=100, help="steps between validation losses")
    add(
        "--ckpt-every",
        type=int,
        metavar="N",
        default=500,
        help="steps between checkpoints (also at the end)",
    )
    add(
        "--keep-checkpoints",
        type=int,
        metavar="N",
        default=3,
        help="how many of the newest checkpoints stay",
    )
    add(
        "--log-every",
        type=int,
        metavar="N",
        default=10,
        help="steps between metrics rows and progress lines",
    )
    add(
        "--sample",
        type=int,
        metavar="N",
        default=None,
        help=f"bytes to generate at the end after a validation prompt, 0 for none (default: "
        f"{SAMPLE_BYTES} or what --max-seq-len leaves; none for {', '.join(NO_KV_CACHE)})",
    )
    add("--dry-run", action="store_true", help="print the train step's compiled memory and exit")
    add(
        "--mesh",
        metavar="SHAPE",
        default=None,
        help="data (dp), sequence (sp: ring attention) and tensor (tp: heads and MLP) "
        "parallelism over the devices, e.g. dp=2,sp=2,tp=2, axes left out are 1; not saved "
        "with the run (default: one device)",
    )
    return p


def _given(argv) -> set[str]:
    """The options named on the command line (a resume takes the others from the run)."""
    p = make_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed and checked options; bad ones raise UsageError."""
    a = make_parser().parse_args(argv)
    a.given = _given(argv)
    check_args(a)
    return a


def _prompt_len(max_seq_len: int) -> int:
    return max(1, min(32, max_seq_len // 2))


def check_args(a) -> None:
    """Validate the options and fill in the derived defaults; may run twice (after a merge)."""
    if a.attention not in ATTENTION:
        raise UsageError(
            f"--attention {a.attention!r}: unknown, choose from {', '.join(ATTENTION)}"
        )
    if a.attention in ("pallas", "cudnn") and jax.default_backend() != "gpu":
        raise UsageError(
            f"--attention {a.attention} needs a GPU, the backend here is {jax.default_backend()}"
        )
    if a.sinks and a.attention not in SINKS:
        raise UsageError(
            f"--sinks applies to --attention {', '.join(SINKS)} (their softmax takes sinks), "
            f"not {a.attention}"
        )
    if a.resume and a.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite replaces it: pick one")
    positive = ("seq_len", "batch_size", "steps", "layers", "heads", "dim")
    positive += ("eval_every", "ckpt_every", "log_every", "keep_checkpoints")
    for name in positive + ("max_seq_len", "schedule_steps"):
        value = getattr(a, name)
        if value is not None and value < 1:
            raise UsageError(f"{_flag(name)} must be positive, got {value}")
    if not (math.isfinite(a.lr) and a.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {a.lr}")
    if a.warmup < 0:
        raise UsageError(f"--warmup must be zero or positive, got {a.warmup}")
    if a.seed < 0:
        raise UsageError(f"--seed must be zero or positive, got {a.seed}")
    if a.data is not None:
        a.data = str(pathlib.Path(a.data).expanduser().resolve())
    a.max_seq_len = a.max_seq_len or a.seq_len
    if a.seq_len > a.max_seq_len:
        raise UsageError(
            f"--seq-len {a.seq_len} is larger than the model allows (--max-seq-len {a.max_seq_len})"
        )
    a.schedule_steps = a.schedule_steps or a.steps
    if a.dim % a.heads:
        raise UsageError(f"--dim {a.dim} must be divisible by --heads {a.heads}")
    for name, owner in VARIANT_KNOBS.items():
        value, flag = getattr(a, name), _flag(name)
        if name in a.given and a.attention != owner:  # silently ignored would be a mistake
            raise UsageError(f"{flag} applies to --attention {owner}, not {a.attention}")
        if value is None:
            setattr(a, name, getattr(_DEFAULTS, name))
        elif isinstance(value, int) and value < 1:
            raise UsageError(f"{flag} must be positive, got {value}")
    if a.attention == "hybrid":
        try:
            GPTConfig(attention="hybrid", num_layers=a.layers, hybrid_pattern=a.hybrid_pattern)
        except ValueError as e:
            raise UsageError(f"--hybrid-pattern {a.hybrid_pattern}: {e}") from None
    prompt = _prompt_len(a.max_seq_len)
    room = a.max_seq_len - prompt
    if a.sample is None:
        a.sample = 0 if a.attention in NO_KV_CACHE else min(SAMPLE_BYTES, room)
    elif a.sample < 0:
        raise UsageError(f"--sample must be zero or positive, got {a.sample}")
    elif a.sample > 0 and a.attention in NO_KV_CACHE:
        raise UsageError(
            f"--sample {a.sample}: --attention {a.attention} has no KV cache to generate with, "
            "use --sample 0"
        )
    elif a.sample > room:
        raise UsageError(
            f"--sample {a.sample} does not fit: --max-seq-len {a.max_seq_len} holds a "
            f"{prompt}-byte prompt and at most {room} generated bytes"
        )
    a.mesh_shape = parse_mesh(a.mesh)
    if a.mesh_shape:
        check_mesh(a)


def parse_mesh(text: str | None) -> dict[str, int] | None:
    """'dp=2,tp=4' -> {'dp': 2, 'sp': 1, 'tp': 4}: every axis of MESH_AXES, those not named 1;
    checked against the devices present."""
    if not text:
        return None
    try:
        given = [(k.strip(), int(v)) for k, v in (part.split("=") for part in text.split(","))]
    except ValueError:
        raise UsageError(
            f"--mesh {text}: expected axis=size pairs such as dp=2,sp=2,tp=2"
        ) from None
    names = [k for k, _ in given]
    if unknown := [k for k in names if k not in MESH_AXES]:
        raise UsageError(f"--mesh {text}: unknown axis {unknown[0]!r}, the axes are dp, sp, tp")
    if len(set(names)) < len(names):
        raise UsageError(f"--mesh {text}: each axis once")
    if bad := [f"{k}={v}" for k, v in given if v < 1]:
        raise UsageError(f"--mesh {text}: sizes must be positive, got {bad[0]}")
    shape = {axis: dict(given).get(axis, 1) for axis in MESH_AXES}
    if math.prod(shape.values()) != jax.device_count():
        raise UsageError(
            f"--mesh {text}: dp·sp·tp = {math.prod(shape.values())} must equal the device count, "
            f"{jax.device_count()} present"
        )
    return shape


def check_mesh(a) -> None:
    """The model and the batch split as --mesh asks (parse_mesh checked the mesh itself)."""
    dp, sp, tp = (a.mesh_shape[axis] for axis in MESH_AXES)
    if a.attention != "chunked":  # other layers have no ring form: they would ignore the mesh
        raise UsageError(
            f"--mesh {a.mesh} runs every attention layer as ring attention on the chunked "
            f"core, use --attention chunked (got {a.attention})"
        )
    if a.batch_size % dp:
        raise UsageError(f"--mesh {a.mesh}: dp={dp} must divide --batch-size {a.batch_size}")
    if a.heads % tp:  # GPTConfig's kv heads are the query heads here: both split over tp
        raise UsageError(
            f"--mesh {a.mesh}: tp={tp} must divide --heads {a.heads} (query and kv heads)"
        )
    if a.seq_len % (2 * sp):
        raise UsageError(  # causal ring attention deals 2·sp zig-zag pieces, two per device
            f"--mesh {a.mesh}: sp={sp} needs --seq-len to be a multiple of 2·sp = {2 * sp} "
            f"(the causal ring's zig-zag layout), got {a.seq_len}"
        )


def make_mesh(shape: dict[str, int] | None):
    """The (dp, sp, tp) mesh of parse_mesh's shape, Auto axes; None without --mesh."""
    if shape is None:
        return None
    sizes = tuple(shape[axis] for axis in MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def schedule_length(a) -> int:
    """Steps of warmup + cosine decay: --schedule-steps, or the warmup and one step if longer."""
    return max(a.schedule_steps or a.steps, a.warmup + 1)


def build(a):
    cfg = GPTConfig(
        max_seq_len=a.max_seq_len,
        num_layers=a.layers,
        num_heads=a.heads,
        dim=a.dim,
        attention=a.attention,
        sinks=a.sinks,
        **{name: getattr(a, name) for name in VARIANT_KNOBS},
    )
    mesh = make_mesh(a.mesh_shape)
    model = GPT(cfg, rngs=nnx.Rngs(a.seed), mesh=mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # A function of the run's saved schedule length only: past it optax holds end_value, so a
    # resume with a larger --steps continues at lr/10 and never changes the steps already taken.
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, a.lr, max(a.warmup, 1), schedule_length(a), end_value=a.lr * 0.1
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))

    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params, rest)(batch[:, :-1])  # (B, T, V)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if mesh is None:
        return model, graphdef, rest, params, tx, schedule, jax.jit(train_step), jax.jit(loss_fn)
    # Parameters as their annotations say ("tp", layers.partitioned; the rest copied), Adam's
    # moments like their parameters. tx.init and every step return exactly these shardings, so
    # the step compiles once (left to propagation, its outputs' differ from the first inputs').
    param_sh = nnx.get_named_sharding(params, mesh)
    params = jax.device_put(params, param_sh)
    copied = NamedSharding(mesh, P())
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, params),
        param_sh,
        transform_non_params=lambda _: copied,
    )
    tx = optax.GradientTransformation(jax.jit(tx.init, out_shardings=opt_sh), tx.update)
    train_step = jax.jit(
        train_step,
        in_shardings=(param_sh, opt_sh, batch_sharding(mesh)),
        out_shardings=(param_sh, opt_sh, copied),
    )
    return model, graphdef, rest, params, tx, schedule, train_step, jax.jit(loss_fn)


def checkpoint_manager(out, *, ckpt_every: int = 1, keep: int | None = None, read_only=False):
    """Orbax's CheckpointManager over OUT/checkpoints.

    Saves are atomic (written to STEP.orbax-checkpoint-tmp, renamed when complete) and
    latest_step() sees complete ones only. Saves come every `ckpt_every` steps, at a multi-host
    preemption sync point, and where train() forces one (the end, a signal); the `keep` newest
    stay. A writable manager deletes the leftovers of a save that never finished.
    """
    import orbax.checkpoint as ocp

    cm = ocp.checkpoint_managers
    directory = (pathlib.Path(out) / "checkpoints").resolve()
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    else:
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=cm.AnySavePolicy(
                [cm.FixedIntervalPolicy(ckpt_every), cm.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=None if keep is None else cm.LatestN(n=keep),
            cleanup_tmp_directories=True,
        )
    return ocp.CheckpointManager(directory, options=options)


def incomplete_checkpoints(out) -> list[pathlib.Path]:
    """Checkpoint folders whose save never finished (killed mid-save): never restored."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(out) / "checkpoints"
    if not directory.is_dir():
        return []
    found = ocp.utils.tmp_checkpoints(directory)  # names before orbax 0.12, TemporaryPaths after
    return sorted(directory / p if isinstance(p, str) else pathlib.Path(p.get()) for p in found)


def _save_args(params, opt_state):
    import orbax.checkpoint as ocp

    return ocp.args.StandardSave({"leaves": jax.tree_util.tree_leaves((params, opt_state))})


def restore(out, params, opt_state, manager=None):
    """(params, opt_state, step) of the newest complete checkpoint under OUT/checkpoints."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(out) / "checkpoints"
    try:
        mngr = manager
        if mngr is None:
            if not directory.is_dir():
                raise UsageError(f"--resume: no checkpoint under {directory}")
            mngr = checkpoint_manager(out, read_only=True)
        step = mngr.latest_step()
        if step is None:
            raise UsageError(f"--resume: no checkpoint under {directory}")
        leaves, treedef = jax.tree_util.tree_flatten((params, opt_state))
        got = mngr.restore(step, args=ocp.args.StandardRestore({"leaves": leaves}))
        params, opt_state = jax.tree_util.tree_unflatten(treedef, list(got["leaves"]))
        return params, opt_state, step
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt checkpoint is bad input
        raise UsageError(
            f"--resume: the newest checkpoint under {directory} is unreadable "
            f"({type(e).__name__}); start over with --overwrite"
        ) from e


def plot_losses(out: pathlib.Path) -> None:
    """loss.png from metrics.jsonl, drawn on a bare Figure: the user's pyplot backend stays."""
    from matplotlib.figure import Figure

    rows = _read_metrics(out)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(out / "loss.png", dpi=110)


def _read_metrics(out: pathlib.Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a process killed mid-write
            continue
    return rows


def _open_metrics(out: pathlib.Path, start: int):
    """metrics.jsonl keeping the rows up to `start`: steps after the checkpoint are redone."""
    rows = [r for r in _read_metrics(out) if r["step"] <= start]
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / "metrics.jsonl")
    return open(out / "metrics.jsonl", "a")


def _holds_run(out: pathlib.Path) -> bool:
    ckpts = out / "checkpoints"
    return any((out / f).exists() for f in RUN_FILES[:2]) or (
        ckpts.is_dir() and any(ckpts.iterdir())
    )


def _check_out(a, out: pathlib.Path) -> None:
    """--out is writable and holds a run only with --resume or --overwrite; a resume merges the
    run's saved options into `a` (those not given) and refuses given ones that differ."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".chunkattn-train-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {a.out}: cannot write there ({e.strerror or e})") from None
    config = out / "config.json"
    if not a.resume:
        if _holds_run(out) and not a.overwrite:
            raise UsageError(
                f"--out {a.out} already holds a run: continue it with --resume or replace it "
                "with --overwrite"
            )
        return
    if not config.exists():
        raise UsageError(
            f"--resume: no checkpoint under {out / 'checkpoints'}"
            + (" and no config.json" if (out / "checkpoints").exists() else "")
        )
    try:
        saved = {**ADDED_OPTIONS, **json.loads(config.read_text())["options"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--resume: {config} is unreadable ({type(e).__name__})") from None
    differ = []
    for name in RUN_OPTIONS + RESUME_OPTIONS:
        if name not in saved:
            continue
        if name not in a.given:
            setattr(a, name, saved[name])
        elif name in RUN_OPTIONS and getattr(a, name) != saved[name]:
            shown = {"data": lambda v: v or "(the default corpus)"}.get(name, str)
            differ.append(
                f"--resume: {_flag(name)} {shown(getattr(a, name))} differs from the run's "
                f"{shown(saved[name])} ({config})"
            )
    if differ:
        raise UsageError("\n".join(differ))
    check_args(a)


def _write_config(a, out: pathlib.Path) -> None:
    options = {name: getattr(a, name) for name in RUN_OPTIONS + RESUME_OPTIONS}
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps({"options": options}, indent=1) + "\n")
    os.replace(tmp, out / "config.json")


def _clear_run(out: pathlib.Path) -> None:
    """--overwrite: remove what a run writes in --out, and nothing else."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _StopOnSignal:
    """SIGINT/SIGTERM set a flag the training loop reads after each step; a second one stops now.

    Installed only in the main thread (signal handlers cannot be set elsewhere), and the previous
    handlers come back on exit, so a notebook's interrupt works as before after the run.
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:  # e.g. a background job's SIGINT
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise _StopNow(signum)
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        return False


class _Progress:
    """A tqdm bar (loss, tokens/s, ETA) on a terminal; plain lines every --log-every otherwise."""

    def __init__(self, start: int, total: int, stream):
        self.total, self.stream, self.bar = total, stream, None
        self.first = None  # (time, step) after the first step: the ETA leaves compilation out
        isatty = getattr(stream, "isatty", None)
        if isatty is not None and isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=start, unit="step", file=stream, dynamic_ncols=True
            )

    def step(self, step: int) -> None:
        if self.first is None:
            self.first = (time.perf_counter(), step)
        if self.bar is not None:
            self.bar.update(1)

    def log(self, row: dict) -> None:
        step, loss, tps = row["step"], row["loss"], row["tokens_per_s"]
        val = f"  val {row['val_loss']:.4f}" if "val_loss" in row else ""
        if self.bar is not None:
            post = {"loss": f"{loss:.4f}", "tok/s": f"{tps:,.0f}"}
            if val:
                post["val"] = f"{row['val_loss']:.4f}"
            self.bar.set_postfix(post, refresh=True)
            return
        eta = "?"
        t0, s0 = self.first
        if step > s0:
            eta = _hms((time.perf_counter() - t0) / (step - s0) * (self.total - step))
        print(
            f"step {step}/{self.total}  loss {loss:.4f}{val}  {tps:,.0f} tok/s  eta {eta}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _note(text: str) -> None:
    print(f"chunkattn-train: {text}", file=sys.stderr, flush=True)


def batch_sharding(mesh) -> NamedSharding:
    """Batches [B, T+1] over "dp"; the model splits the sequence over "sp" after the embedding
    (T+1 tokens do not divide by sp)."""
    return NamedSharding(mesh, P("dp", None))


def compiled_memory(a) -> dict[str, int]:
    """Bytes per device of the compiled train step (`memory_analysis()`, compile only):
    temporaries (activations and their gradients), arguments (parameters, optimizer state and
    the batch), outputs."""
    _, _, _, params, tx, _, train_step, _ = build(a)
    mesh = make_mesh(a.mesh_shape)
    sharding = None if mesh is None else batch_sharding(mesh)
    batch = jax.ShapeDtypeStruct((a.batch_size, a.seq_len + 1), jnp.int32, sharding=sharding)
    mem = train_step.lower(params, tx.init(params), batch).compile().memory_analysis()
    return {
        "temp": mem.temp_size_in_bytes,
        "argument": mem.argument_size_in_bytes,
        "output": mem.output_size_in_bytes,
    }


def _dry_run(a) -> int:
    mem = compiled_memory(a)
    where = f", mesh {a.mesh}, per device" if a.mesh_shape else ""
    print(
        f"train step, attention={a.attention}, seq_len={a.seq_len}, batch={a.batch_size}{where}: "
        f"compiled temp {mem['temp'] / 2**20:.1f} MiB, arguments "
        f"{mem['argument'] / 2**20:.1f} MiB"
    )
    return 0


def run(a) -> int:
    if a.dry_run:
        return _dry_run(a)
    out = pathlib.Path(a.out)
    _check_out(a, out)  # on --resume this takes the run's options
    train, val = load_corpus(a.data)
    check_corpus(a, train, val)
    if a.overwrite:
        _clear_run(out)
    for path in incomplete_checkpoints(out) if a.resume else []:
        _note(f"ignoring incomplete checkpoint {path} (its save never finished)")
    mngr = checkpoint_manager(out, ckpt_every=a.ckpt_every, keep=a.keep_checkpoints)
    try:
        return _train(a, out, train, val, mngr)
    finally:
        mngr.close()


def _train(a, out: pathlib.Path, train, val, mngr) -> int:
    latest = mngr.latest_step() if a.resume else None
    if latest is not None and latest > a.steps:
        raise UsageError(f"--steps {a.steps}: the run in {a.out} is already at step {latest}")
    model, graphdef, rest, params, tx, schedule, train_step, eval_loss = build(a)
    opt_state = tx.init(params)
    start = 0
    if a.resume and latest is None:
        _note("no complete checkpoint yet: starting the run from step 0")
    elif a.resume:
        params, opt_state, start = restore(out, params, opt_state, manager=mngr)
    _write_config(a, out)
    if a.resume:
        _note(f"resuming {a.out} at step {start} of {a.steps}")
    if a.steps > schedule_length(a) and start < a.steps:
        _note(
            f"steps {max(start, schedule_length(a)) + 1}-{a.steps} run past the learning-rate "
            f"schedule ({schedule_length(a)} steps) at its final rate {a.lr * 0.1:g}"
        )
    mesh = make_mesh(a.mesh_shape)
    metrics = _open_metrics(out, start)
    step, saved, tokens, row_tokens = start, start, 0, 0
    t_start = t_row = time.perf_counter()
    progress = _Progress(start, a.steps, sys.stderr)
    stop = _StopOnSignal()
    try:
        with stop:
            while step < a.steps and stop.signum is None:
                batch = jnp.asarray(batch_at(train, a.seed, step, a.batch_size, a.seq_len))
                if mesh is not None:
                    batch = jax.device_put(batch, batch_sharding(mesh))
                params, opt_state, loss = train_step(params, opt_state, batch)
                step += 1
                tokens += a.batch_size * a.seq_len
                row_tokens += a.batch_size * a.seq_len
                progress.step(step)
                evaluate = step % a.eval_every == 0 or step == a.steps
                if step % a.log_every == 0 or evaluate:
                    loss, now = float(loss), time.perf_counter()
                    row = {"step": step, "loss": loss, "lr": float(schedule(step))}
                    row["tokens_per_s"] = row_tokens / (now - t_row)
                    if evaluate:
                        vb = jnp.asarray(batch_at(val, a.seed + 1, 0, a.batch_size, a.seq_len))
                        row["val_loss"] = float(eval_loss(params, vb))
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    progress.log(row)
                    t_row, row_tokens = time.perf_counter(), 0
                    if not math.isfinite(loss):
                        progress.close()
                        print(
                            f"chunkattn-train: loss became {loss} at step {step}; the newest "
                            f"checkpoint is step {mngr.latest_step()}",
                            file=sys.stderr,
                        )
                        return 1
                force = step == a.steps or stop.signum is not None
                if mngr.save(step, args=_save_args(params, opt_state), force=force):
                    saved = step
                if mngr.reached_preemption(step):  # multi-host: Orbax saved at the sync point
                    stop.signum = signal.SIGTERM
            if saved != step:  # a signal arrived after this step's save decision
                mngr.save(step, args=_save_args(params, opt_state), force=True)
                saved = step
            mngr.wait_until_finished()
    finally:
        progress.close()
        metrics.close()
    seconds = time.perf_counter() - t_start
    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        where = out / "checkpoints" / str(step) if mngr.latest_step() is not None else None
        print(
            f"chunkattn-train: {name}: stopped at step {step} of {a.steps}; checkpoint "
            f"{where or '(none: no step trained)'}, metrics {out / 'metrics.jsonl'}; "
            f"continue with: chunkattn-train --out {a.out} --resume",
            file=sys.stderr,
            flush=True,
        )
        return 128 + stop.signum
    plot_losses(out)
    sample = None
    if a.sample > 0:
        trained = nnx.merge(graphdef, params, rest)
        if mesh is not None:  # decoding uses the KV cache, not the ring: a model without mesh
            trained = GPT(trained.cfg, rngs=nnx.Rngs(0))
            nnx.update(trained, params)
        prompt_len = _prompt_len(a.max_seq_len)
        prompt = jnp.asarray(val[:prompt_len][None].astype(np.int32))
        text = generate(
            trained, prompt, a.sample, rng=jax.random.PRNGKey(a.seed), temperature=0.8, top_k=40
        )
        sample = bytes(np.asarray(text[0], np.uint8)).decode("utf-8", errors="replace")
        (out / "sample.txt").write_text(sample)
    print(_summary(a, out, start, step, seconds, tokens, sample))
    return 0


def _summary(a, out, start, step, seconds, tokens, sample) -> str:
    rows = _read_metrics(out)
    val = [r for r in rows if "val_loss" in r]
    if step > start:
        head = (
            f"done: step {step} of {a.steps} ({step - start} trained in {_hms(seconds)}, "
            f"{tokens / seconds:,.0f} tokens/s)"
        )
    else:
        head = f"nothing to train: the run is at step {step} of {a.steps}"
    if a.sample:
        sample_line = str(out / "sample.txt")
    elif a.attention in NO_KV_CACHE:
        sample_line = f"none (--attention {a.attention} has no KV cache to generate with)"
    else:
        sample_line = "none (--sample 0)"
    lines = [
        f"chunkattn-train: {head}",
        f"  final loss   train {rows[-1]['loss']:.4f} (step {rows[-1]['step']}), validation "
        f"{val[-1]['val_loss']:.4f} (step {val[-1]['step']}), nats/byte"
        if rows and val
        else "  final loss   (no metrics)",
        f"  checkpoints  {out / 'checkpoints'} (newest: step {step})",
        f"  metrics      {out / 'metrics.jsonl'}",
        f"  plot         {out / 'loss.png'}",
        f"  sample       {sample_line}",
    ]
    if sample is not None:
        prompt_len = _prompt_len(a.max_seq_len)
        lines += [
            f"--- sample: {a.sample} bytes generated after a {prompt_len}-byte prompt from "
            "the validation text ---",
            sample,
            "--- end of sample ---",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except UsageError as e:
        for line in str(e).splitlines() or [""]:
            print(f"chunkattn-train: error: {line}", file=sys.stderr)
        return 2
    except _StopNow as e:
        print(
            f"chunkattn-train: {signal.Signals(e.signum).name} again: stopped at once; "
            "--resume continues from the newest complete checkpoint",
            file=sys.stderr,
        )
        return 128 + e.signum
    except KeyboardInterrupt:
        print("chunkattn-train: interrupted before training started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
