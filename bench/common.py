"""Shared benchmark machinery: the registry of implementations, memory and time measurement.

Every implementation is a function `fn(q, k, v, causal) -> out` on [B, T, N, H] arrays.
`available(backend)` lists those that exist on this backend (peers such as tokamax only when
importable), and the linear-time variants of `chunkattn.variants` (causal only) as
`variant_*`. Memory comes from the compiled program (`memory_analysis().temp_size_in_bytes`)
and, on GPU, from the device's peak allocation; an out-of-memory is a result, not a crash.

Results go to `bench/out/` (untracked) unless a run is meant to be committed: `--out
bench/results`. Every script prints one line per finished row with the time left (`Progress`);
plots name implementations as people do (`label`) and the device by its model (`device_model`).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import chunkattn
from chunkattn.variants import caterpillar, delta_rule, dpfp, linear_attention

Fn = Callable[[jax.Array, jax.Array, jax.Array, bool], jax.Array]

# Untracked (.gitignore): a run lands in bench/results/, which README cites, only on purpose.
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "out"


def add_out_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        help="folder for the CSV and plot (default bench/out/, untracked; "
        "--out bench/results to commit the run)",
    )


def dense_xla(q, k, v, causal):
    """Textbook attention: einsum, softmax, einsum, with the [T, S] scores in memory."""
    s = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    s = s * q.shape[-1] ** -0.5
    if causal:
        s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1).astype(v.dtype), v)


def _chunkattn(impl: str) -> Fn:
    return lambda q, k, v, causal: chunkattn.dot_product_attention(
        q, k, v, is_causal=causal, implementation=impl
    )


def _chunkattn_mosaic_backward(dq: str = "kernel") -> Fn:
    """pallas_mosaic with the Mosaic GPU backward (experimental, opt-in: issue 21), its dQ in
    its own kernel ("kernel") or added atomically in the dK/dV kernel ("atomic")."""
    from chunkattn.pallas import MosaicBackwardConfig, MosaicConfig

    cfg = MosaicConfig(backward=MosaicBackwardConfig(dq=dq))
    return lambda q, k, v, causal: chunkattn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="pallas_mosaic", config=cfg
    )


def _jax_nn(impl: str) -> Fn:
    return lambda q, k, v, causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation=impl
    )


def _rabe_staats(q, k, v, causal):
    import rabe_staats  # bench/ is on sys.path when scripts run from it

    return rabe_staats.attention(q, k, v, is_causal=causal)


def _tokamax(impl: str) -> Fn:
    def fn(q, k, v, causal):
        import tokamax

        return tokamax.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)

    return fn


# The linear-time variants (chunkattn.variants) take extra inputs that plain attention lacks.
# The adapters derive them from q and k, cheaply and deterministically, so every implementation
# still sees the same (q, k, v) and the memory/time measured is that of the variant itself.
CATERPILLAR_HEIGHT = 4  # CH: the GPT layer's default (chunkattn.variants.layers)
CATERPILLAR_LENGTH = 16  # CL: the GPT layer's default, so bench and training measure one model
VARIANT_CHUNK = 64  # chunk size of linear_attention and delta_rule (their default)


def _causal_only(name: str, causal: bool) -> None:
    if not causal:
        raise NotImplementedError(f"{name} is causal only (a recurrence over the sequence)")


def variant_linear(q, k, v, causal):
    """Causal linear attention, elu(x)+1 features, normalized (`linear_attention` defaults)."""
    _causal_only("variant_linear", causal)
    return linear_attention(q, k, v, chunk_size=VARIANT_CHUNK)


def variant_delta(q, k, v, causal):
    """Delta-rule fast weights on DPFP(ν=1) features of q and k, β = sigmoid(mean_h k).

    ν=1 doubles the key dimension (2·H), as the GPT layer's default does; β depends on the input
    (like the layer's learned β) so the backward pass includes its gradient.
    """
    _causal_only("variant_delta", causal)
    beta = jax.nn.sigmoid(jnp.mean(k.astype(jnp.float32), axis=-1))  # (B, T, N)
    return delta_rule(dpfp(q, 1), dpfp(k, 1), v, beta, chunk_size=VARIANT_CHUNK)


def variant_caterpillar(q, k, v, causal):
    """Caterpillar with CH=4, CL=16 (the GPT layer's defaults) and no initial state.

    Gates G = sigmoid(q[..., :CH]) clipped as the layer does, G / max(1, Σ_heads G), so the
    recurrence stays contractive; H must be at least CH.
    """
    _causal_only("variant_caterpillar", causal)
    ch = CATERPILLAR_HEIGHT
    if q.shape[-1] < ch:
        raise ValueError(f"variant_caterpillar needs head dim >= CH={ch}, got q.shape={q.shape}")
    g = jax.nn.sigmoid(q[..., :ch].astype(jnp.float32))  # (B, T, N, CH)
    g = g / jnp.maximum(1.0, jnp.sum(g, axis=2, keepdims=True))
    return caterpillar(q, k, v, g, length=CATERPILLAR_LENGTH)


VARIANTS: dict[str, Fn] = {
    "variant_linear": variant_linear,
    "variant_delta": variant_delta,
    "variant_caterpillar": variant_caterpillar,
}


def available(backend: str | None = None) -> dict[str, Fn]:
    """Implementations to compare on `backend`, by the names used in the results' impl column.

    The softmax implementations come first, then the linear-time variants (causal only: they
    report "unsupported" for full attention).
    """
    backend = backend or jax.default_backend()
    impls: dict[str, Fn] = {"chunkattn_chunked": _chunkattn("chunked")}
    if backend == "gpu":
        impls["chunkattn_pallas"] = _chunkattn("pallas")
        # The experimental Hopper forward (Triton backward); it declines what it does not serve.
        impls["chunkattn_pallas_mosaic"] = _chunkattn("pallas_mosaic")
        impls["chunkattn_pallas_mosaic_bwd"] = _chunkattn_mosaic_backward()  # and Mosaic bwd
        impls["chunkattn_pallas_mosaic_bwd_atomic"] = _chunkattn_mosaic_backward("atomic")
    impls["dense_xla"] = dense_xla
    impls["jax_nn_xla"] = _jax_nn("xla")
    if backend == "gpu":
        impls["jax_nn_cudnn"] = _jax_nn("cudnn")
    impls["rabe_staats"] = _rabe_staats
    try:
        import tokamax  # noqa: F401

        for name in ("xla_chunked", "triton", "mosaic"):
            impls[f"tokamax_{name}"] = _tokamax(name)
    except ImportError:
        pass
    impls.update(VARIANTS)
    return impls


def inputs(key, batch, seq_len, heads, head_dim, dtype, n=1):
    """n independent sets of (q, k, v, dO), standard normal."""
    sets = []
    for kk in jax.random.split(key, n):
        sets.append(
            tuple(
                jax.random.normal(x, (batch, seq_len, heads, head_dim), dtype)
                for x in jax.random.split(kk, 4)
            )
        )
    return sets


def programs(fn: Fn, causal: bool):
    """(forward, forward+backward) jitted programs of (q, k, v, dO)."""
    f = lambda q, k, v: fn(q, k, v, causal)
    fwd = jax.jit(lambda q, k, v, do: f(q, k, v))
    fwdbwd = jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))
    return fwd, fwdbwd


def is_oom(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in ("resource_exhausted", "out of memory", "oom", "allocat"))


def status_of(e: BaseException) -> str:
    if isinstance(e, NotImplementedError):
        return "unsupported"
    return "OOM" if is_oom(e) else f"error: {type(e).__name__}"


def temp_bytes(program, *abstract_args) -> int:
    return program.lower(*abstract_args).compile().memory_analysis().temp_size_in_bytes


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def median_seconds(program, arg_sets, reps: int, warmup: int = 2) -> float:
    """Median wall time of `program` over `reps` runs, rotating input sets, after warm-up."""
    for i in range(warmup):
        jax.block_until_ready(program(*arg_sets[i % len(arg_sets)]))
    times = []
    for i in range(reps):
        args = arg_sets[i % len(arg_sets)]
        t = time.perf_counter()
        jax.block_until_ready(program(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_medians(programs: dict, arg_sets, reps: int, warmup: int = 2) -> dict:
    """Median wall time of each program, timed round-robin: run r of every program, then run
    r + 1, so that a load on a shared machine falls on all of them alike.

    `programs` maps a name to a program; a program whose warm-up raises maps to the exception.
    """
    results: dict = {}
    for name, program in programs.items():
        try:
            for i in range(warmup):
                jax.block_until_ready(program(*arg_sets[i % len(arg_sets)]))
            results[name] = []
        except Exception as e:  # noqa: BLE001 - OOM / unsupported are results
            results[name] = e
    for i in range(reps):
        args = arg_sets[i % len(arg_sets)]
        for name, program in programs.items():
            if isinstance(results[name], list):
                t = time.perf_counter()
                jax.block_until_ready(program(*args))
                results[name].append(time.perf_counter() - t)
    return {n: statistics.median(v) if isinstance(v, list) else v for n, v in results.items()}


def attention_flops(batch, heads, seq_len, head_dim, causal) -> float:
    """Forward FLOPs (DESIGN §5): 4·B·N·T·S·H, halved for causal; fwd+bwd is 3.5× this."""
    return 4.0 * batch * heads * seq_len * seq_len * head_dim / (2.0 if causal else 1.0)


def device_model() -> str:
    """The device by its model, for plot titles: the GPU/TPU kind, or the CPU's model name.

    `device_kind` of a CPU device is just "cpu", so the CPU's name comes from the OS.
    """
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return dev.device_kind
    name = ""
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((x.split(":", 1)[1].strip() for x in fh if x.startswith("model name")), "")
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} CPU, {cores} cores" if "cpu" not in name.lower() else f"{name}, {cores} cores"


def environment() -> dict[str, str]:
    return {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "device_model": device_model(),
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(),
    }


def read_rows(path) -> list[dict]:
    """A results CSV back as rows: numbers as int/float, True/False as bool, empty cells absent."""
    import csv

    def value(text: str):
        if text in ("True", "False"):
            return text == "True"
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with open(path) as fh:
        return [{k: value(v) for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]


def device_title(row: dict) -> str:
    """The device for a plot title: its model, or for runs that predate that column, the kind."""
    if row.get("device_model"):
        return row["device_model"]
    return "CPU" if row["device"] == "cpu" else row["device"]


def tag_arg(text: str) -> str:
    """argparse type of --tag: it becomes part of a file name, so letters, digits, - and _ only."""
    if text and not text.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"letters, digits, '-' or '_' only, got {text!r}")
    return text


def result_stem(bench: str, tag: str, env: dict[str, str]) -> str:
    """`<bench>_[<tag>_]<backend>_<date>`: a tag keeps a focused run beside the main one."""
    return "_".join(x for x in (bench, tag, env["backend"], env["date"]) if x)


# Legend names: what people call each implementation (the CSVs keep the ids).
LABELS = {
    "chunkattn_chunked": "chunkattn (chunked)",
    "chunkattn_pallas": "chunkattn (Pallas)",
    "chunkattn_pallas_mosaic": "chunkattn (Mosaic GPU fwd)",
    "chunkattn_pallas_mosaic_bwd": "chunkattn (Mosaic GPU fwd+bwd)",
    "chunkattn_pallas_mosaic_bwd_atomic": "chunkattn (Mosaic GPU fwd+bwd, atomic dQ)",
    "dense_xla": "dense XLA",
    "jax_nn_xla": "jax.nn (XLA)",
    "jax_nn_cudnn": "cuDNN (jax.nn)",
    "rabe_staats": "Rabe & Staats (scan + checkpoint)",
    "tokamax_xla_chunked": "tokamax (XLA chunked)",
    "tokamax_triton": "tokamax (Triton)",
    "tokamax_mosaic": "tokamax (Mosaic)",
    "variant_linear": "linear attention",
    "variant_delta": "delta rule (DPFP ν=1)",
    "variant_caterpillar": "Caterpillar (CH=4, CL=16)",
}


def label(impl: str) -> str:
    return LABELS.get(impl, impl)


def format_tflops(x: float | None) -> str:
    """Four significant digits: 514.3 on a GPU, 0.01234 on a CPU (never a bare "0.0")."""
    return "-" if x is None or x != x else f"{x:.4g}"


def format_bytes(b: float) -> str:
    """1 GiB, 512 MiB, 96 TiB: binary units, as memory is reported."""
    for unit, p in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if b >= 2**p:
            v = b / 2**p
            return f"{v:,.0f} {unit}" if v >= 10 or v == int(v) else f"{v:.1f} {unit}"
    return f"{b:.0f} B"


def format_tokens(t: float) -> str:
    """512, 1k, 16k, 1M: sequence lengths as people say them."""
    for unit, p in (("M", 20), ("k", 10)):
        if t >= 2**p and t % 2**p == 0:
            return f"{int(t) // 2**p}{unit}"
    return f"{t:,.0f}"


def log2_ticks(lo: float, hi: float, max_ticks: int = 8) -> list[float]:
    """Powers of two covering [lo, hi], thinned to at most about max_ticks."""
    a, b = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
    step = max(1, math.ceil((b - a + 1) / max_ticks))
    return [2.0**e for e in range(a, b + 1, step)]


def memory_axis(ax, values: list[float], axis: str = "y") -> None:
    """A log axis of bytes with ticks at powers of two labelled in MiB / GiB / TiB."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log", base=2)
    target.set_major_locator(FixedLocator(log2_ticks(min(values), max(values))))
    target.set_minor_locator(NullLocator())
    target.set_major_formatter(FuncFormatter(lambda b, _: format_bytes(b)))


def tokens_axis(ax, values: list[float]) -> None:
    """A log2 x axis of sequence lengths labelled 1k, 16k, 1M."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(log2_ticks(min(values), max(values))))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda t, _: format_tokens(t)))


def _hms(seconds: float) -> str:
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """One line per finished row: `[3/12] <row>  (0:41 elapsed, ETA 2:03)`.

    The ETA assumes the remaining rows take the mean time of the finished ones.
    """

    def __init__(self, total: int):
        self.total = max(total, 1)
        self.done = 0
        self.start = time.perf_counter()

    def row(self, text: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * max(self.total - self.done, 0)
        count = f"[{self.done:>{len(str(self.total))}}/{self.total}]"
        print(f"{count} {text}  ({_hms(elapsed)} elapsed, ETA {_hms(eta)})", flush=True)
