"""Compile the Pallas kernels for the H100 (sm_90a) on a host without a GPU, and report for
every kernel and config what ptxas and the launch give it: registers, spill bytes, stack,
shared memory, grid and warps (DESIGN.md §5: the offline proxy for speed).

    .venv/bin/pip install -e ".[cuda-aot]"       # once: the CUDA plugin, ptxas, nvdisasm
    .venv/bin/python bench/compile_report.py     # the default configs, causal: table + JSON
    .venv/bin/python bench/compile_report.py --features all --jobs 2
    .venv/bin/python bench/compile_report.py --head-dims 128 --dtypes bf16 --backward split \
        --sass chunkattn_bwd_dkdv

How: the jax CUDA plugin makes a compile-only H100 from a GPU target config (`H100`, below; no
driver, no device). Compiling `jit(value_and_grad(loss))` on arguments placed on that device runs
XLA's GPU pipeline on the CPU: Pallas -> Triton IR -> PTX (the plugin's Triton) -> ptxas ->
cubin, as on the GPU. The loss calls the public `dot_product_attention(implementation="pallas")`.
XLA's dump gives each launch's grid, threads and dynamic shared memory (its thunk sequence). XLA
runs ptxas from the CUDA dir it is given, here one whose ptxas is a wrapper that keeps a copy of
each PTX and of ptxas's `-v` report (registers, spills, stack): XLA from jax 0.11 on dumps no
PTX, and this way the figures are those of the very ptxas run that made the cubin.

The Mosaic GPU forward (`implementation="pallas_mosaic"`, `--backward mosaic`) is compiled by
Mosaic's own pipeline inside the same `compile()`; XLA's dump shows only its custom call, so
its figures come from Mosaic's dump (MOSAIC_GPU_DUMP_TO with _PTX, _PTXAS and _HOST_LLVM: ptxas
-v, and the launch with its grid, threads and dynamic shared memory). Those cases compile the
forward only: its backward is the Triton kernels, reported by the other modes. `--backward
mosaic_bwd` compiles the Mosaic forward with the Mosaic GPU backward (value_and_grad with
`MosaicConfig(backward=MosaicBackwardConfig())`, issue 21): three Mosaic kernels per case, at
head dims 64 and 128; `--config` then sets MosaicBackwardConfig fields. `--backward
mosaic_bwd_atomic` is the same with `MosaicBackwardConfig(dq="atomic")`: dQ added by TMA
reduce-adds in the dK/dV kernel, two Mosaic kernels per case (forward, dK/dV).

Nothing runs, so there is no time here. The figures depend on the jax version (its Triton),
which the header names; the GPU machine runs jax 0.11.2 (bench/NOTES.md). Exit status 1 when a
case fails to compile or a kernel asks for more shared memory than a block may have.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import multiprocessing
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from unittest import mock

# Before jax is imported (also in each --jobs worker, which imports this file anew): the plugin
# checks the CUDA driver's version unless told not to, and without a driver it would not
# register, so there would be no compile-only device.
os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.pop("CHUNKATTN_PALLAS_INTERPRET", None)  # compile the kernels, not the interpreter

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

import chunkattn  # noqa: E402
from chunkattn.pallas import MosaicBackwardConfig, MosaicConfig, PallasConfig  # noqa: E402

# The H100 SXM as XLA sees it (its `GpuTargetConfig`): what a compile needs to know of the
# device. sm_90a; 227 KiB of shared memory per block (shared_memory_per_block_optin).
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
runtime_version { major: 13 minor: 0 patch: 0 }
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 12 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
SMEM_LIMIT = int(re.search(r"shared_memory_per_block_optin: (\d+)", H100)[1])

DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}
# dot_product_attention's `precision`: None is HIGHEST for float32 inputs (exact: FMA loops in
# the kernels), DEFAULT and HIGH TF32 tensor cores (config.f32_dot_precision).
PRECISIONS = {
    "none": None,
    "default": jax.lax.Precision.DEFAULT,
    "high": jax.lax.Precision.HIGH,
    "highest": jax.lax.Precision.HIGHEST,
}
HEAD_DIMS = ((32, 32), (64, 64), (72, 72), (96, 96), (128, 128), (192, 128), (256, 256))
KERNELS = {
    "chunkattn_fwd": "fwd",
    "chunkattn_bwd_dq": "dQ",
    "chunkattn_bwd_dkdv": "dK/dV",
    "chunkattn_mosaic_fwd": "mosaic fwd",
    "chunkattn_mosaic_bwd_dq": "mosaic dQ",
    "chunkattn_mosaic_bwd_dkdv": "mosaic dK/dV",
}
# "mosaic": the Mosaic GPU forward alone; "mosaic_bwd": it and the Mosaic GPU backward;
# "mosaic_bwd_atomic": the same with the backward's atomic dQ (no dQ kernel).
BACKWARDS = ("split", "atomic", "mosaic", "mosaic_bwd", "mosaic_bwd_atomic")
MOSAIC_MODES = ("mosaic", "mosaic_bwd", "mosaic_bwd_atomic")
# What the Mosaic GPU forward serves (mosaic.unsupported_features); other cases are not made.
MOSAIC_FEATURES = ("full", "causal", "window", "lengths", "segments", "soft_cap")
MOSAIC_FEATURES += ("mask_fn", "score_fn", "sinks", "gqa")
# The Mosaic GPU backward declines a mask_fn / score_fn (dispatch.py); Triton's serves them.
MOSAIC_BWD_FEATURES = tuple(f for f in MOSAIC_FEATURES if f not in ("mask_fn", "score_fn"))
MOSAIC_HEAD_DIMS = (64, 128, 256)
MOSAIC_BWD_HEAD_DIMS = (64, 128)  # mosaic_backward.HEAD_DIMS
MOSAIC_KERNELS = ("chunkattn_mosaic_fwd", "chunkattn_mosaic_bwd_dq", "chunkattn_mosaic_bwd_dkdv")
# The atomic backward's dK/dV kernel takes a JAX Ref, and jax's discharge of it (mpmd_map, jax
# 0.10-0.12) drops the kernel's name: Mosaic compiles and dumps it as "new_body".
MOSAIC_DUMP_NAMES = {"chunkattn_mosaic_bwd_dkdv": ("chunkattn_mosaic_bwd_dkdv", "new_body")}

# ------------------------------------------------------------------------------------ cases
# Each feature: the static keywords of dot_product_attention, and its array inputs as
# (keyword, shape, dtype) with the letters B, T, S, N standing for the case's sizes.
FEATURES = {
    "full": ({}, []),
    "causal": (dict(is_causal=True), []),
    "window": (dict(local_window_size=(256, 16), q_offset=5), []),
    "lengths": ({}, [("query_seq_lengths", "B", "i32"), ("key_value_seq_lengths", "B", "i32")]),
    "segments": ({}, [("segment_ids", "B,T", "i32")]),
    "soft_cap": (dict(is_causal=True, logits_soft_cap=30.0), []),
    "mask_fn": (dict(is_causal=True, mask_fn=lambda b, h, i, j: (i + j) % 3 != 0), []),
    "score_fn": (dict(score_fn=lambda s, b, h, i, j: s - 0.1 * jnp.abs(i - j).astype(s.dtype)), []),
    "dropout": (dict(dropout_rate=0.1), [("dropout_rng", "2", "u32")]),
    "dense_mask": ({}, [("mask", "B,1,T,S", "bool")]),
    "bias": ({}, [("bias", "1,N,1,S", "f32")]),
    "bias_2d": (dict(logits_soft_cap=20.0), [("bias", "B,N,T,S", "f32")]),
    "sinks": (dict(is_causal=True), [("sinks", "N", "f32")]),
    "gqa": (dict(is_causal=True), []),  # 4 query heads per kv head
}
INPUT_DTYPES = {"i32": jnp.int32, "u32": jnp.uint32, "bool": jnp.bool_, "f32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class Case:
    """One compile: a feature at a head dim, dtype and backward, with the default blocks unless
    `config` overrides PallasConfig fields. B=2, T=S=1024, N=8 as in bench/NOTES.md's tables."""

    feature: str
    dtype: str
    head_dim: int
    head_dim_v: int
    backward: str  # PallasConfig.backward: "split" or "atomic"; "mosaic": the Mosaic forward
    config: tuple[tuple[str, int], ...] = ()
    precision: str = "none"  # a key of PRECISIONS
    batch: int = 2
    seq_len: int = 1024
    heads: int = 8

    @property
    def name(self) -> str:
        dims = f"h{self.head_dim}" + (
            f"_{self.head_dim_v}" if self.head_dim_v != self.head_dim else ""
        )
        extra = "".join(f" {k}={v}" for k, v in self.config)
        if self.precision != "none":
            extra += f" precision={self.precision}"
        return f"{self.feature} {self.dtype} {dims} {self.backward}{extra}"

    def pallas_config(self) -> PallasConfig | MosaicConfig:
        if self.backward == "mosaic":  # block_k and num_stages are the Mosaic kernel's
            return MosaicConfig(**dict(self.config))
        if self.backward == "mosaic_bwd":  # the fields are the Mosaic backward's
            return MosaicConfig(backward=MosaicBackwardConfig(**dict(self.config)))
        if self.backward == "mosaic_bwd_atomic":
            bwd = MosaicBackwardConfig(**dict(self.config), dq="atomic")
            return MosaicConfig(backward=bwd)
        return PallasConfig(backward=self.backward, **dict(self.config))


def program(case: Case, device):
    """(loss's value_and_grad over q, k, v; its abstract arguments on `device`)."""
    static, extra = FEATURES[case.feature]
    B, T, N = case.batch, case.seq_len, case.heads
    K = N // 4 if case.feature == "gqa" else N
    sizes = {"B": B, "T": T, "S": T, "N": N}
    sharding = jax.sharding.SingleDeviceSharding(device)

    def arg(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    dt = DTYPES[case.dtype]
    args = [arg((B, T, N, case.head_dim), dt), arg((B, T, K, case.head_dim), dt)]
    args.append(arg((B, T, K, case.head_dim_v), dt))
    names = []
    for name, shape, dtype in extra:
        names.append(name)
        dims = tuple(sizes[d] if d in sizes else int(d) for d in shape.split(","))
        args.append(arg(dims, INPUT_DTYPES[dtype]))
    cfg = case.pallas_config()
    prec = PRECISIONS[case.precision]
    if case.backward == "mosaic":

        def forward(q, k, v, *inputs):
            kw = dict(zip(names, inputs, strict=True))
            return chunkattn.dot_product_attention(
                q, k, v, **static, **kw, implementation="pallas_mosaic", config=cfg, precision=prec
            )

        return forward, args

    impl = "pallas_mosaic" if case.backward in MOSAIC_MODES else "pallas"

    def loss(q, k, v, *inputs):
        kw = dict(zip(names, inputs, strict=True))
        out = chunkattn.dot_product_attention(
            q, k, v, **static, **kw, implementation=impl, config=cfg, precision=prec
        )
        return jnp.sum(out.astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1, 2)), args


def cases(features, head_dims, dtypes, backwards, config, precisions=("none",)) -> list[Case]:
    """Every combination; the Mosaic forward's only where it serves them (bf16/f16, head dims
    64/128/256, `MOSAIC_FEATURES`)."""

    def served(f, h, hv, dt, bwd):
        if bwd not in MOSAIC_MODES:
            return True
        served_dims = MOSAIC_HEAD_DIMS if bwd == "mosaic" else MOSAIC_BWD_HEAD_DIMS
        served_features = MOSAIC_FEATURES if bwd == "mosaic" else MOSAIC_BWD_FEATURES
        dims_ok = h in served_dims and hv in served_dims
        return f in served_features and dims_ok and dt in ("bf16", "f16")

    combos = itertools.product(features, head_dims, dtypes, backwards, precisions)
    return [
        Case(f, dt, h, hv, bwd, config, prec)
        for f, (h, hv), dt, bwd, prec in combos
        if served(f, h, hv, dt, bwd)
    ]


# --------------------------------------------------------------------------- compiling one
@dataclasses.dataclass
class Call:
    """A pallas_call as the program made it: enough to show its blocks and compile it alone."""

    name: str
    kernel: object
    kwargs: dict
    avals: list


@contextlib.contextmanager
def recording(calls: list[Call], sharding):
    """Record every pallas_call the traced program makes (the kernels' blocks live in the
    kernel's `st`, a `kernel_common.Static`; a failed compile is retried one call at a time)."""
    real = pl.pallas_call

    def pallas_call(kernel, *args, **kwargs):
        call = real(kernel, *args, **kwargs)

        def run(*operands):
            avals = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for x in operands]
            calls.append(Call(kwargs.get("name", "?"), kernel, kwargs, avals))
            return call(*operands)

        return run

    with mock.patch.object(pl, "pallas_call", pallas_call):
        yield


@contextlib.contextmanager
def as_on_the_gpu(device):
    """Lower as on that GPU: the dispatcher sees a GPU backend, and Pallas's Triton lowering
    (jax >= 0.11 reads the compute capability from the default device) sees the H100."""
    with mock.patch.object(jax, "default_backend", lambda: "gpu"), jax.default_device(device):
        yield


@contextlib.contextmanager
def stderr_to(path: pathlib.Path):
    """The process's stderr (XLA's C++ log: its ptxas runs' -v output) into a file."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def compile_dumped(fn, args, dump: pathlib.Path, calls: list[Call]) -> None:
    """Lower fn for the H100 and compile it, with XLA's dump and log, and each kernel's PTX and
    ptxas report (`PTXAS_WRAPPER`), in `dump`."""
    shutil.rmtree(dump, ignore_errors=True)
    dump.mkdir(parents=True)
    device = next(iter(args[0].sharding.device_set))
    options = {"xla_dump_to": str(dump), "xla_gpu_cuda_data_dir": str(cuda_dir_keeping_ptx())}
    os.environ["COMPILE_REPORT_KEEP"] = str(dump)  # read by the ptxas wrapper XLA runs
    with stderr_to(dump / "xla.log"):
        with as_on_the_gpu(device), recording(calls, args[0].sharding):
            lowered = jax.jit(fn).lower(*args)
        lowered.compile(compiler_options=options)


def one_line(e: BaseException) -> str:
    text = " | ".join(s.strip() for s in str(e).strip().splitlines() if s.strip())
    return f"{type(e).__name__}: {text}"[:300]


def compile_case(case: Case, device, dump: pathlib.Path) -> dict:
    """Compile one case; a result with a row per kernel (a failure is a result too)."""
    if case.backward in MOSAIC_MODES:
        return compile_mosaic_case(case, device, dump)
    t0 = time.perf_counter()
    result = dict(case=case.name, **dataclasses.asdict(case), status="ok", error=None)
    result["config"] = dict(case.config)
    calls: list[Call] = []
    rows: dict[str, dict] = {}
    try:
        fn, args = program(case, device)
        compile_dumped(fn, args, dump, calls)
        rows = kernel_rows(dump, {c.name for c in calls})
    except Exception as e:  # noqa: BLE001 - a failure is a finding, reported per case
        result.update(status="fail", error=one_line(e))
        for call in {c.name: c for c in calls}.values():  # XLA's error names no kernel
            rows[call.name] = compile_alone(call, dump / call.name)
    result["kernels"] = []
    for call in {c.name: c for c in calls}.values():
        row = dict(kernel=call.name, **launch_config(call), **rows.get(call.name, {}))
        row["flags"] = flags(row)
        result["kernels"].append(row)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


MOSAIC_DUMP = ("MOSAIC_GPU_DUMP_TO", "MOSAIC_GPU_DUMP_PTX", "MOSAIC_GPU_DUMP_PTXAS")
# The host code's launch (Mosaic's host LLVM IR): grid x, y, z, cluster x, y, z, threads x, y,
# z, dynamic shared memory.
MOSAIC_LAUNCH = re.compile(r"@mosaic_gpu_launch_kernel\(ptr %\w+, ((?:i32 \d+, ){10})")
MOSAIC_HASH = re.compile(r'kernel_hash = "((?:[^"\\]|\\.)*)"')
# Mosaic compiles a kernel once per process: a kernel equal to an earlier case's (the masks are
# data, so "full" and "causal" are one kernel; the forward of mosaic_bwd is mosaic's) leaves no
# dump; its figures are that case's, found by its name and hash.
_MOSAIC_SEEN: dict[tuple[str, str], tuple[str, dict]] = {}


def mosaic_launch_rows(case: Case) -> dict[str, dict]:
    """The Mosaic kernels of a case with their tiles: the forward's 2·block_q × block_k; dQ's
    128 query rows × block_k_dq; dK/dV's 2·block_kv keys × block_q."""
    cfg = case.pallas_config()
    bk = cfg.resolve_block_k((case.head_dim, case.head_dim_v))
    rows = {MOSAIC_KERNELS[0]: (f"{2 * cfg.block_q}x{bk}", cfg.num_stages)}
    if case.backward in ("mosaic_bwd", "mosaic_bwd_atomic"):
        b = cfg.backward
        if b.dq == "kernel":
            rows[MOSAIC_KERNELS[1]] = (f"128x{b.block_k_dq}", b.num_stages)
        rows[MOSAIC_KERNELS[2]] = (f"{2 * b.block_kv}x{b.block_q}", b.num_stages)
    return {
        name: dict(kernel=name, blocks=blocks, warps=12, stages=stages)
        for name, (blocks, stages) in rows.items()
    }


def mosaic_hashes(text: str) -> dict[str, str]:
    """Kernel name -> kernel_hash, per Mosaic custom call of a lowered program."""
    out = {}
    for line in text.splitlines():
        names = [n for n in MOSAIC_KERNELS for alias in dump_names(n) if alias in line]
        if names and (m := MOSAIC_HASH.search(line)):
            out[names[0]] = m[1]
    return out


def compile_mosaic_case(case: Case, device, dump: pathlib.Path) -> dict:
    """The Mosaic GPU kernels of one case: each one's ptxas report and launch, from Mosaic's
    dump (the plugin reads MOSAIC_GPU_DUMP_* at each compile)."""
    t0 = time.perf_counter()
    result = dict(case=case.name, **dataclasses.asdict(case), status="ok", error=None)
    result["config"] = dict(case.config)
    shutil.rmtree(dump, ignore_errors=True)
    dump.mkdir(parents=True)
    rows = mosaic_launch_rows(case)
    env = dict.fromkeys(MOSAIC_DUMP, "1") | {"MOSAIC_GPU_DUMP_TO": str(dump)}
    env["MOSAIC_GPU_DUMP_HOST_LLVM"] = "1"
    try:
        fn, args = program(case, device)
        with mock.patch.dict(os.environ, env), stderr_to(dump / "mosaic.log"):
            with as_on_the_gpu(device):
                lowered = jax.jit(fn).lower(*args)
            lowered.compile()
        hashes = mosaic_hashes(lowered.as_text())
        for name, row in rows.items():
            figures = mosaic_figures(dump, name)
            key = (name, hashes.get(name, ""))
            if "regs" in figures:
                _MOSAIC_SEEN[key] = (case.name, figures)
            elif key in _MOSAIC_SEEN:  # compiled before in this process: the same cubin
                first, figures = _MOSAIC_SEEN[key]
                figures = dict(figures, same_kernel_as=first)
            row.update(figures)
    except Exception as e:  # noqa: BLE001 - a failure is a finding, reported per case
        result.update(status="fail", error=one_line(e))
        for row in rows.values():
            row["error"] = result["error"]
        if m := re.search(r"exceeds available shared memory.*?(\d+)", str(e)):
            for row in rows.values():
                row["smem"] = int(m[1])
    for log in dump.glob("*.mlir-passes.log"):  # ~100 MB each, and nothing read from it
        log.unlink()
    for row in rows.values():
        row["flags"] = flags(row)
    result["kernels"] = list(rows.values())
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def dump_names(name: str) -> tuple[str, ...]:
    """The names a Mosaic kernel may have in a lowered program and Mosaic's dump."""
    return MOSAIC_DUMP_NAMES.get(name, (name,))


def mosaic_figures(dump: pathlib.Path, name: str) -> dict:
    """ptxas's figures of the Mosaic kernel `name` and its launch (grid, threads, smem)."""
    row: dict = {}
    name = next((n for n in dump_names(name) if any(dump.glob(f"{n}*.ptxas"))), name)
    for report in dump.glob(f"{name}*.ptxas"):
        for entry, usage in parse_ptxas(report.read_text(errors="replace")).items():
            if entry.startswith(name):
                row.update(usage)
    for host in dump.glob(f"{name}*.ll"):
        if m := MOSAIC_LAUNCH.search(host.read_text(errors="replace")):
            v = [int(x) for x in re.findall(r"i32 (\d+)", m[1])]
            row.update(grid=",".join(map(str, v[:3])), threads=v[6], smem=v[9])
    ptx = sorted(dump.glob(f"{name}*.ptx"))
    if ptx:
        text = ptx[0].read_text(errors="replace")
        row["wgmma"] = text.count("wgmma.mma_async")
        row["setmaxnreg"] = text.count("setmaxnreg")
        row["tma_reduce"] = text.count("cp.reduce.async.bulk")  # the atomic dQ's reduce-adds
    return row


def compile_alone(call: Call, dump: pathlib.Path) -> dict:
    """One kernel compiled on its own: its figures, or its error (with the shared memory it
    asked for when that was the reason)."""

    def fn(*args):
        return pl.pallas_call(call.kernel, **call.kwargs)(*args)

    try:
        compile_dumped(fn, call.avals, dump, [])
        return kernel_rows(dump, {call.name}).get(call.name, {})
    except Exception as e:  # noqa: BLE001
        row = dict(error=one_line(e))
        if m := re.search(r"requested (\d+), available: \d+", str(e)):
            row["smem"] = int(m[1])
        return row


def launch_config(call: Call) -> dict:
    """The kernel's tile (block_q x block_k), warps and pipeline stages."""
    st = call.kernel.keywords["st"]  # functools.partial(kernel, st=Static, ...)
    bwd = call.name == "chunkattn_bwd_dkdv"
    bq, bk = (st.block_q_bwd, st.block_k_bwd) if bwd else (st.block_q, st.block_k)
    params = call.kwargs["compiler_params"]
    return dict(blocks=f"{bq}x{bk}", warps=params.num_warps, stages=params.num_stages)


def flags(row: dict) -> list[str]:
    out = []
    if row.get("error"):
        out.append("COMPILE-FAIL")
    if (row.get("smem") or 0) > SMEM_LIMIT:
        out.append("SMEM-OVERFLOW")
    if row.get("spill_stores") or row.get("spill_loads"):
        out.append("SPILL")
    if row.get("notes"):
        out.append("PERF-LOSS")  # ptxas's "Potential Performance Loss" (wgmma serialized)
    return out


# ---------------------------------------------------------------- XLA's output -> figures
THUNK = re.compile(
    r"\] (\S+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+) bytes"
)


def kernel_rows(dump: pathlib.Path, names: set[str]) -> dict[str, dict]:
    """Per kernel: grid, threads, dynamic shared memory (the thunk sequence) and what ptxas said
    of it (the reports the wrapper kept)."""
    rows = {}
    for f in dump.glob("*thunk_sequence.txt"):
        for m in THUNK.finditer(f.read_text()):
            if m[1] in names:
                grid = m[2].replace(" ", "")
                rows[m[1]] = dict(grid=grid, threads=int(m[3].split(",")[0]), smem=int(m[4]))
    for report in dump.glob("ptxas-*.ptxas"):
        for name, usage in parse_ptxas(report.read_text(errors="replace")).items():
            if name in rows:
                rows[name].update(usage)
    for ptx in dump.glob("ptxas-*.ptx"):
        text = ptx.read_text(errors="replace")
        for name in re.findall(r"\.entry\s+(\w+)\(", text):
            if name in rows:
                rows[name]["math"] = ptx_math(text)
    return rows


def ptx_math(text: str) -> str:
    """What the kernel's matrix products compiled to, from its PTX: Hopper's wgmma, Ampere's
    mma.sync (with the operand type: tf32 for float32 on tensor cores) or, with neither, FMA
    loops (float32 at HIGHEST); with the count of each instruction in the code."""
    parts = []
    for op, pattern in (("wgmma", r"wgmma\.mma_async\S*"), ("mma", r"\bmma\.sync\S*")):
        found = re.findall(pattern, text)
        types = sorted({t for f in found for t in ("tf32", "bf16", "f16") if f".{t}" in f})
        if found:
            parts.append(f"{op}.{'/'.join(types) or '?'} {len(found)}")
    fma = len(re.findall(r"\bfma\.rn\.f32\b", text))
    if not parts or fma:
        parts.append(f"fma {fma}")
    return ", ".join(parts)


def parse_ptxas(text: str) -> dict[str, dict]:
    """`ptxas -v` output -> per entry function: regs, spill stores/loads, stack, notes."""
    out: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if m := re.search(r"Potential Performance Loss: (.*) in the function '(\w+)'", line):
            out.setdefault(m[2], {}).setdefault("notes", []).append(m[1].strip())
        elif m := re.search(r"Compiling entry function '(\w+)'", line):
            current = out.setdefault(m[1], {})
        elif current is None:
            continue
        elif m := re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        ):
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif m := re.search(r"Used (\d+) registers", line):
            current["regs"] = int(m[1])
            current = None
    return out


def kernel_ptx(dump: pathlib.Path, name: str) -> pathlib.Path:
    """The PTX that defines kernel `name`, as the wrapper kept it (its cubin beside it)."""
    for f in sorted(dump.glob("ptxas-*.ptx")):
        if re.search(rf"\.entry\s+{name}\(", f.read_text()):
            return f
    raise FileNotFoundError(f"no PTX for {name} in {dump}")


def cuda_tool(name: str) -> str:
    """ptxas or nvdisasm: from the NVIDIA wheels the cuda-aot extra installs, else PATH."""
    try:
        import nvidia.cu13

        for root in nvidia.cu13.__path__:
            if (path := pathlib.Path(root) / "bin" / name).exists():
                return str(path)
    except ImportError:
        pass
    if found := shutil.which(name):
        return found
    raise SystemExit(f"compile_report.py: no {name}: .venv/bin/pip install -e '.[cuda-aot]'")


PTXAS_WRAPPER = """#!/bin/sh
# ptxas as XLA runs it (ptxas IN.ptx -o OUT.cubin FLAGS), keeping copies of the PTX, the cubin
# and ptxas's -v report in $COMPILE_REPORT_KEEP as ptxas-*.ptx, .cubin and .ptxas.
if [ -f "$1" ] && [ "$2" = "-o" ] && [ -n "$COMPILE_REPORT_KEEP" ]; then
  keep="$COMPILE_REPORT_KEEP/ptxas-$(basename "$1")"
  cp "$1" "$keep.ptx"
  {ptxas} "$@" -v 2> "$keep.ptxas"
  status=$?
  cat "$keep.ptxas" >&2
  [ -f "$3" ] && cp "$3" "$keep.cubin"
  exit $status
fi
exec {ptxas} "$@"
"""


@functools.cache
def cuda_dir_keeping_ptx() -> pathlib.Path:
    """A CUDA dir for XLA (`xla_gpu_cuda_data_dir`): links to the real one's files (libdevice,
    nvlink, ...) with ptxas replaced by `PTXAS_WRAPPER`. One per process, removed at exit."""
    real_ptxas = pathlib.Path(cuda_tool("ptxas")).resolve()
    real = real_ptxas.parents[1]
    fake = pathlib.Path(tempfile.mkdtemp(prefix="compile_report_cuda_"))
    atexit.register(shutil.rmtree, fake, ignore_errors=True)
    for entry in real.iterdir():
        if entry.name != "bin":
            (fake / entry.name).symlink_to(entry)
    (fake / "bin").mkdir()
    for tool in (real / "bin").iterdir():
        (fake / "bin" / tool.name).symlink_to(tool)
    wrapper = fake / "bin" / "ptxas"
    wrapper.unlink()
    wrapper.write_text(PTXAS_WRAPPER.format(ptxas=shlex.quote(str(real_ptxas))))
    wrapper.chmod(0o755)
    return fake


# ------------------------------------------------------------------------------------ output
COLUMNS = (
    "kernel",
    "blocks",
    "warps",
    "stages",
    "grid",
    "regs",
    "spill st/ld",
    "stack",
    "smem",
    "math",
)


def table_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        for k in r["kernels"] or [dict(kernel="-", flags=["COMPILE-FAIL"])]:
            get = lambda key, k=k: "-" if k.get(key) is None else str(k[key])
            spill = f"{get('spill_stores')}/{get('spill_loads')}"
            cells = [KERNELS.get(k["kernel"], k["kernel"]), get("blocks"), get("warps")]
            cells += [get("stages"), get("grid"), get("regs"), spill, get("stack"), get("smem")]
            cells.append(get("math"))
            rows.append([r["case"], *cells, " ".join(k["flags"])])
    return rows


def format_table(results: list[dict]) -> str:
    head = ["case", *COLUMNS, "flags"]
    rows = table_rows(results)
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    left = {0, 1, 2, len(head) - 2, len(head) - 1}  # names, math and flags left, numbers right
    lines = []
    for row in [head, *rows]:
        cells = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    notes: dict[tuple[str, str], list[str]] = {}  # (kernel, ptxas's note) -> cases
    for r in results:
        for k in r["kernels"]:
            for note in dict.fromkeys(k.get("notes", [])):
                notes.setdefault((KERNELS.get(k["kernel"], k["kernel"]), note), []).append(
                    r["case"]
                )
    for (kernel, note), where in notes.items():
        lines.append(
            f"PERF-LOSS, ptxas on {kernel} in {len(where)} of {len(results)} cases: {note}"
        )
    lines += [f"{r['case']}: {r['error']}" for r in results if r["error"]]
    return "\n".join(lines)


def progress_text(r: dict) -> str:
    kernels = ", ".join(
        f"{KERNELS.get(k['kernel'], k['kernel'])} {k.get('regs', '-')}/{k.get('spill_stores', '-')}"
        for k in r["kernels"]
    )
    return f"{r['case']}: {r['status']}, regs/spill {kernels or '-'}"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("jax", "jaxlib", "jax-cuda13-plugin"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    text = subprocess.run([cuda_tool("ptxas"), "--version"], capture_output=True, text=True)
    out["ptxas"] = (re.search(r"V(\d+\.\d+\.\d+)", text.stdout) or [None, "?"])[1]
    return out


def commit() -> str | None:
    root = pathlib.Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True)
    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return None
    dirty = git("status", "--porcelain", "chunkattn").stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


# -------------------------------------------------------------------------------- running
def h100():
    """The compile-only H100 (the plugin's INFO lines while it loads kept off the console)."""
    from jax.experimental import topologies

    with stderr_to(pathlib.Path(os.devnull)):
        try:
            topo = topologies.get_topology_desc(
                platform="cuda", topology="1x1x1", target_config=H100
            )
        except Exception as e:  # noqa: BLE001
            raise SystemExit(
                f"compile_report.py: no compile-only CUDA device ({one_line(e)}); it needs the "
                "CUDA plugin: .venv/bin/pip install -e '.[cuda-aot]'"
            ) from None
    return topo.devices[0]


_DEVICE = None  # one per --jobs worker


def _worker_compile(case: Case, dump_root: str) -> dict:
    global _DEVICE
    if _DEVICE is None:
        _DEVICE = h100()
    return compile_case(case, _DEVICE, pathlib.Path(dump_root) / case.name.replace(" ", "_"))


def run_all(todo: list[Case], jobs: int, dump_root: pathlib.Path) -> list[dict]:
    """Compile every case (one progress line each), in `jobs` processes when more than one."""
    progress = common.Progress(len(todo))
    results = {}
    if jobs <= 1:
        for case in todo:
            results[case] = _worker_compile(case, str(dump_root))
            progress.row(progress_text(results[case]))
    else:  # processes, not threads or forks (jax does not fork): each makes its own device
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=spawn) as pool:
            futures = {pool.submit(_worker_compile, c, str(dump_root)): c for c in todo}
            for f in concurrent.futures.as_completed(futures):
                results[futures[f]] = f.result()
                progress.row(progress_text(results[futures[f]]))
    return [results[c] for c in todo]


def show_code(case: Case, kernel: str, sass: bool) -> None:
    """Print one kernel's PTX, or its SASS (nvdisasm of its cubin)."""
    name = next((n for n, short in KERNELS.items() if kernel in (n, short)), kernel)
    if case.backward in MOSAIC_MODES:
        show_mosaic_code(case, name, sass)
        return
    with tempfile.TemporaryDirectory() as tmp:
        dump = pathlib.Path(tmp)
        fn, args = program(case, h100())
        compile_dumped(fn, args, dump, [])
        ptx = kernel_ptx(dump, name)
        if not sass:
            print(ptx.read_text())
            return
        cubin = ptx.with_suffix(".cubin")  # the cubin XLA got for it
        out = subprocess.run(
            [cuda_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True
        )
        print(out.stdout or out.stderr)


def show_mosaic_code(case: Case, name: str, sass: bool) -> None:
    """Print a Mosaic GPU kernel's PTX, or its SASS: Mosaic's own dump (MOSAIC_GPU_DUMP_SASS),
    which needs an nvdisasm on PATH; without one, the dumped PTX through the wheels' ptxas
    (sm_90a) and nvdisasm."""
    device = h100()
    with tempfile.TemporaryDirectory() as tmp:
        dump = pathlib.Path(tmp)
        env = {"MOSAIC_GPU_DUMP_TO": str(dump), "MOSAIC_GPU_DUMP_PTX": "1"}
        if sass:
            env["MOSAIC_GPU_DUMP_SASS"] = "1"
        fn, args = program(case, device)
        with mock.patch.dict(os.environ, env), stderr_to(dump / "mosaic.log"):
            with as_on_the_gpu(device):
                lowered = jax.jit(fn).lower(*args)
            lowered.compile()

        def dumped(ext: str) -> list[pathlib.Path]:
            return sorted(f for n in dump_names(name) for f in dump.glob(f"{n}*.{ext}"))

        if sass and dumped("sass"):
            print(dumped("sass")[0].read_text(errors="replace"))
            return
        if not dumped("ptx"):
            raise FileNotFoundError(f"no PTX of {name} in {sorted(dump.iterdir())}")
        ptx = dumped("ptx")[0]
        if not sass:
            print(ptx.read_text(errors="replace"))
            return
        cubin = ptx.with_suffix(".cubin")
        subprocess.run([cuda_tool("ptxas"), "-arch=sm_90a", "-o", str(cubin), str(ptx)], check=True)
        out = subprocess.run(
            [cuda_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True
        )
        print(out.stdout or out.stderr)


def head_dim_pair(text: str) -> tuple[int, int]:
    """ "128" -> (128, 128); "192/128" -> (192, 128): the head dims of q/k and of v."""
    h, _, hv = text.partition("/")
    return int(h), int(hv or h)


def parse_config(items: list[str]) -> tuple[tuple[str, int], ...]:
    fields = {f.name for f in dataclasses.fields(PallasConfig)} - {"backward"}
    fields |= {f.name for f in dataclasses.fields(MosaicBackwardConfig)}  # for mosaic_bwd
    out = []
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields or not value.isdigit():
            raise argparse.ArgumentTypeError(
                f"--config takes FIELD=INT, FIELD one of {sorted(fields)}"
            )
        out.append((key, int(value)))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--features",
        default="causal",
        help=f"comma-separated, or 'all' ({', '.join(FEATURES)}); default causal",
    )
    p.add_argument(
        "--head-dims",
        default=",".join(f"{h}" if h == hv else f"{h}/{hv}" for h, hv in HEAD_DIMS),
        help="H or H/Hv, comma-separated (default: 32..256 and MLA's 192/128)",
    )
    p.add_argument("--dtypes", default="bf16,f16,f32", help="of bf16, f16, f32")
    p.add_argument(
        "--precision",
        default="none",
        help="dot_product_attention's precision, comma-separated, of "
        f"{', '.join(PRECISIONS)} (default none: HIGHEST for float32)",
    )
    p.add_argument(
        "--backward",
        default="split,atomic",
        help="PallasConfig.backward modes (split, atomic), or mosaic: the Mosaic GPU forward "
        "(pallas_mosaic) alone, for the features and head dims it serves, or mosaic_bwd: it "
        "and the Mosaic GPU backward (head dims 64, 128), or mosaic_bwd_atomic: the same with "
        "its atomic dQ (MosaicBackwardConfig(dq='atomic'))",
    )
    p.add_argument(
        "--config",
        nargs="*",
        default=[],
        metavar="FIELD=INT",
        help="PallasConfig fields to set (block_q=64 num_stages=3 ...); default: the heuristic",
    )
    p.add_argument("--jobs", type=int, default=1, help="cases compiled at once (processes)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--ptx", metavar="KERNEL", help="print this kernel's PTX (one case)")
    p.add_argument("--sass", metavar="KERNEL", help="print this kernel's SASS (one case)")
    p.add_argument("--tag", type=common.tag_arg, default="", help="a word in the file names")
    p.add_argument(
        "--out",
        default=str(common.DEFAULT_OUT),
        help="folder for the table and JSON (default bench/out/, untracked; --out "
        "bench/results to commit the run)",
    )
    args = p.parse_args(argv)

    features = list(FEATURES) if args.features == "all" else args.features.split(",")
    head_dims = [head_dim_pair(h) for h in args.head_dims.split(",")]
    dtypes, backwards = args.dtypes.split(","), args.backward.split(",")
    precisions = args.precision.split(",")
    for what, given, known in (
        ("--features", features, FEATURES),
        ("--dtypes", dtypes, DTYPES),
        ("--backward", backwards, BACKWARDS),
        ("--precision", precisions, PRECISIONS),
    ):
        if unknown := [x for x in given if x not in known]:
            p.error(f"{what}: unknown {unknown}; known: {', '.join(known)}")
    try:
        config = parse_config(args.config)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    todo = cases(features, head_dims, dtypes, backwards, config, precisions)

    if args.ptx or args.sass:
        if len(todo) != 1:
            p.error(
                f"--ptx/--sass show one case; these options select {len(todo)}: narrow them with "
                "--features, --head-dims, --dtypes, --backward"
            )
        show_code(todo[0], args.ptx or args.sass, sass=bool(args.sass))
        return 0

    device = h100()  # exits naming the extra when the plugin is missing
    ver = versions()
    header = dict(
        date=datetime.date.today().isoformat(),
        target=f"{device.device_kind} (sm_90a), compile only",
        smem_limit=SMEM_LIMIT,
        **ver,
        chunkattn=commit(),
    )
    title = (
        f"chunkattn {header['chunkattn']} on {header['target']}: jax {ver['jax']} (plugin "
        f"{ver['jax-cuda13-plugin']}), ptxas {ver['ptxas']}; B=2 T=S=1024 N=8; "
        f"shared memory limit {SMEM_LIMIT} B per block; {header['date']}"
    )
    log = sys.stderr if args.json else sys.stdout  # with --json, stdout is the JSON alone
    with contextlib.redirect_stdout(log), tempfile.TemporaryDirectory() as tmp:
        print(title, flush=True)
        results = run_all(todo, args.jobs, pathlib.Path(tmp))

    failed = [r["case"] for r in results if r["status"] != "ok"]
    kernels = [k for r in results for k in r["kernels"]]
    overflow = [k for k in kernels if "SMEM-OVERFLOW" in k["flags"]]
    spilling = [k for k in kernels if "SPILL" in k["flags"]]
    summary = (
        f"{len(results)} cases, {len(kernels)} kernels: {len(failed)} cases failed to compile, "
        f"{len(overflow)} kernels over the shared memory limit, {len(spilling)} kernels spill"
    )
    table = f"{title}\n{format_table(results)}\n{summary}\n"
    payload = dict(header, summary=summary, results=results)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = common.result_stem(
        "compile_report", args.tag, dict(backend="sm90a", date=header["date"])
    )
    (out / f"{stem}.txt").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    if args.json:
        print(json.dumps(payload, indent=1))
    else:
        print("\n" + table, end="")
    print(f"wrote {out / stem}.txt and .json", file=log)
    return 1 if failed or overflow else 0


if __name__ == "__main__":
    sys.exit(main())
