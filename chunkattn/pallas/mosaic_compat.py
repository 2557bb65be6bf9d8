"""The Mosaic GPU (`plgpu`) calls whose API differs between the jax versions chunkattn runs on:
0.10 (the CPU machines), 0.11 (the GPU image) and 0.12. Every difference lives here, so the
kernel in `mosaic.py` reads the same on each.

- `transpose(ref)`: a transposed view of a 2-D shared-memory ref (a wgmma operand). 0.10 has
  only `plgpu.transpose_ref`; 0.11 adds `ref.transpose`; both lower to the same view.
- `load(ref, layout)`: a register array in a given layout. 0.10 requires an index argument,
  0.11 takes one optionally, 0.12 takes none.
- `interpret_params()`: the Mosaic GPU interpreter (`plgpu.InterpretGPUParams`, public from
  0.11). Its wgmma of 0.10 cannot read a transposed operand (q·kᵀ), so 0.10 has none here.
  It needs `INTERPRETER_CPU_THREADS` XLA:CPU threads (`xla_cpu_threads()`), or it can deadlock.
- `mma(...)`, `mma_pair(...)`, `mma_accumulate(...)`, `mma_accumulate_and(...)` and
  `mma_sum(...)`: the matrix products of the forward and the backward (`mosaic_backward.py`).
  Compiled, the accumulating ones take P (or dS) from registers and accumulate in place
  (`pl.run_state`, as jax's attention_mgpu.py). The interpreter implements neither (its wgmma
  reads A from shared memory only, and it cannot lower run_state's effects), so under it P goes
  through shared memory and the product is added to the accumulator afterwards: the same sum,
  another instruction path.
- `kernel(...)`: `plgpu.kernel` that takes a JAX Ref operand (its custom_vmap wrapper rejects
  one); `reduce_add_to_gmem(...)`: a float32 TMA reduce-add, which the interpreter (0.11, 0.12)
  lacks and gets as a read-add-write. The backward's atomic dQ uses both.
- `skips_empty_maps(fn)`: a kernel launch that a vmap over an axis of size 0 does not launch
  (Mosaic GPU's TMA copies reject an empty memref, jax 0.10 to 0.12).
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

JAX_VERSION = tuple(int(x) for x in jax.__version__.split(".")[:2])

WGMMA = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma accumulator
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column


def transpose(ref):
    """ref viewed transposed (2-D), as wgmma's B operand for q·kᵀ."""
    if JAX_VERSION < (0, 11):
        return plgpu.transpose_ref(ref, (1, 0))
    return ref.transpose((1, 0))  # transpose_ref is deprecated from 0.11


@functools.cache
def _load_takes_index() -> bool:
    """0.10 requires the index; 0.11 deprecates it; 0.12 has none."""
    idx = inspect.signature(plgpu.load).parameters.get("idx")
    return idx is not None and idx.default is inspect.Parameter.empty


def load(ref, layout):
    """The whole of `ref` as a register array in `layout` (from global or shared memory)."""
    if _load_takes_index():
        return plgpu.load(ref, (), layout=layout, optimized=False)
    return plgpu.load(ref, layout=layout, optimized=False)


# The interpreter runs each warpgroup of a kernel as its own XLA:CPU program, on a Python thread
# started by a host callback of the program that launched the kernel (which waits for them), and
# a warpgroup waiting at a barrier blocks in a host callback too. XLA:CPU runs parts of a program,
# blocking host callbacks included, on its intra-op thread pool, so the launcher's callback and
# each warpgroup's barrier wait can each hold one of its threads: 1 + 3 at most (the interpreter
# chains a warpgroup's callbacks through a token, so one each). With every thread held, the part
# of a warpgroup's program queued behind them never runs and the others wait for its barrier
# arrivals forever: the hang of issue 21 (bench/NOTES.md), seen with 2 threads (a 2-core machine)
# and 1. One thread more than can be held always leaves one free.
INTERPRETER_CPU_THREADS = 5


def xla_cpu_threads() -> int:
    """The size of XLA:CPU's thread pools as jaxlib sizes them when its CPU client starts:
    PJRT_NPROC, else NPROC, else the CPUs this process may run on; at least the CPU devices."""
    count = None
    for name in ("PJRT_NPROC", "NPROC"):
        try:
            count = max(0, int(os.environ[name]))
            break
        except (KeyError, ValueError):
            continue
    if count is None:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(count or 1, jax.config.jax_num_cpu_devices)


def interpret_params():
    """Parameters that run a plgpu kernel in the Mosaic GPU interpreter on the CPU.

    Raises NotImplementedError on jax 0.10: its interpreter fails on a transposed wgmma operand
    ('TransposeTransform' object has no attribute 'indices'), which q·kᵀ needs. Warns when
    XLA:CPU has fewer than `INTERPRETER_CPU_THREADS` threads: the interpreter can then hang
    (set PJRT_NPROC=5 in the environment before jax starts; tests/conftest.py does).
    """
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None or JAX_VERSION < (0, 11):
        raise NotImplementedError(
            f"the Mosaic GPU interpreter of jax {jax.__version__} cannot run the pallas_mosaic "
            "kernel (a transposed wgmma operand); it needs jax >= 0.11"
        )
    if (threads := xla_cpu_threads()) < INTERPRETER_CPU_THREADS:
        warnings.warn(
            f"the Mosaic GPU interpreter can deadlock with {threads} XLA:CPU threads; set "
            f"PJRT_NPROC={INTERPRETER_CPU_THREADS} (or more) in the environment before jax "
            "starts (chunkattn.pallas.mosaic_compat.INTERPRETER_CPU_THREADS)",
            RuntimeWarning,
            stacklevel=2,
        )
    return params()


def mma(a_ref, b_ref, shape: tuple[int, int], after_issue: Callable[[], None] | None = None):
    """a_ref · b_ref (shared memory, bf16/f16) as a float32 [M, N] register array.

    `after_issue` runs between issuing the wgmma and reading its result (the ping-pong
    schedule barrier of the two compute warpgroups).
    """

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_ref, b_ref)
        if after_issue is not None:
            after_issue()
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def mma_accumulate(
    acc,
    p,
    v_ref,
    p_smem=None,
    while_running: Callable[[], None] | None = None,
):
    """acc + p · v_ref: acc float32 [M, N] (WGMMA layout), p [M, K] bf16/f16 registers, v_ref
    [K, N] in shared memory. `while_running` runs while the tensor cores work (the next
    block's barrier wait).

    `p_smem` (a [M, K] shared-memory buffer) is given only under the interpreter: P is stored
    there and the product added afterwards (module docstring).
    """
    if p_smem is None:

        def body(acc_ref):
            plgpu.wgmma(acc_ref, p, v_ref)
            if while_running is not None:
                while_running()

        return pl.run_state(body)(plgpu.ACC.init(acc))
    p_smem[...] = p
    plgpu.commit_smem()  # the generic-proxy store before the tensor cores read it

    def body_interpret(acc_ref):
        plgpu.wgmma(acc_ref, p_smem, v_ref)
        if while_running is not None:
            while_running()
        return acc_ref[...]

    return acc + pl.run_scoped(body_interpret, plgpu.ACC(acc.shape, jnp.float32))


def mma_pair(first, second, shape: tuple[int, int]):
    """(a₁·b₁, a₂·b₂) for two (a_ref, b_ref) pairs in shared memory, float32 [M, N] each: both
    wgmmas are issued before either result is read, one wait for the two (the backward's
    S = Q·Kᵀ and dP = dO·Vᵀ)."""

    def body(acc1, acc2):
        plgpu.wgmma(acc1, *first)
        plgpu.wgmma(acc2, *second)
        return acc1[...], acc2[...]

    acc = plgpu.ACC(shape, jnp.float32)
    return pl.run_scoped(body, acc, acc)


def mma_accumulate_and(acc, p, b_ref, second, shape: tuple[int, int], p_smem=None):
    """(acc + p·b_ref, a₂·b₂): `mma_accumulate` and a second product `second` = (a₂, b₂) in
    shared memory (float32 [shape]) issued in one wgmma group, one wait for both (the dK/dV
    kernel's dV += Pᵀ·dO and dPᵀ = V·dOᵀ, as jax's attention_mgpu.py). `p_smem`: as in
    `mma_accumulate` (the interpreter's path)."""
    if p_smem is None:

        def body(refs):
            acc_ref, acc2_ref = refs
            plgpu.wgmma(acc_ref, p, b_ref)
            plgpu.wgmma(acc2_ref, *second)

        zeros = plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
        return pl.run_state(body)((plgpu.ACC.init(acc), plgpu.ACC.init(zeros)))
    p_smem[...] = p
    plgpu.commit_smem()

    def body_interpret(acc1, acc2):
        plgpu.wgmma(acc1, p_smem, b_ref)
        plgpu.wgmma(acc2, *second)
        return acc1[...], acc2[...]

    prod, other = pl.run_scoped(
        body_interpret, plgpu.ACC(acc.shape, jnp.float32), plgpu.ACC(shape, jnp.float32)
    )
    return acc + prod, other


def mma_sum(pairs, shape: tuple[int, int]):
    """Σ a·b over `pairs` of (a_ref, b_ref) in shared memory, one float32 [M, N] accumulator
    (the atomic backward's dQ = Σ_u dS_u·K_u over the compute warpgroups' keys)."""

    def body(acc_ref):
        for a_ref, b_ref in pairs:
            plgpu.wgmma(acc_ref, a_ref, b_ref)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def kernel(body, *, out_type, scratch_types, name: str, interpret=None, **mesh):
    """`plgpu.kernel` without its custom_vmap wrapper, which rejects a JAX Ref operand: Refs
    passed to the returned function are read and written in place (the atomic backward's
    float32 dQ, accumulated by TMA reduce-adds). `mesh` holds plgpu.Mesh's fields. No vmap
    rule of its own (plgpu.kernel's adds a grid axis). jax's discharge of the Ref (mpmd_map's,
    0.10 to 0.12) drops `name`: the compiled kernel is called "new_body"."""
    thread_name = mesh.get("thread_name")

    def with_scratch(*refs):
        pl.run_scoped(functools.partial(body, *refs), *scratch_types, collective_axes=thread_name)

    extra = {} if interpret is None else {"interpret": interpret}
    params = mesh.pop("compiler_params", None)
    return pl.kernel(
        with_scratch,
        out_type=out_type,
        mesh=plgpu.Mesh(**mesh, kernel_name=name),
        compiler_params=params,
        name=name,
        **extra,
    )


def skips_empty_maps(fn: Callable) -> Callable:
    """`fn`, a kernel launch on arrays, batched by its own rules, except that under a vmap over
    an axis of size 0 it returns zeros of its results' shapes without launching: the kernels'
    TMA copies of an empty array fail to compile ("invalid memref size")."""

    @jax.custom_batching.custom_vmap
    def call(*args):
        return fn(*args)

    @call.def_vmap
    def rule(axis_size: int, in_batched, *args):
        in_axes = jax.tree.map(lambda batched: 0 if batched else None, tuple(in_batched))
        mapped = jax.vmap(fn, in_axes=in_axes)
        if axis_size:
            out = mapped(*args)
        else:
            shapes = jax.eval_shape(mapped, *args)
            out = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return out, jax.tree.map(lambda _: True, out)

    return call


def reduce_add_to_gmem(value, smem, dst, interpret_barrier=None):
    """dst += value (float32, a wgmma accumulator) through `smem` ([M, N] float32): compiled,
    one TMA reduce-add (`copy_smem_to_gmem(..., reduction_op="add")`, atomic per element,
    asynchronous: wait for its reads of `smem` before writing it again).

    The Mosaic GPU interpreter has no TMA reduction (jax 0.11.2 and 0.12: "reduction_op not
    supported"): given `interpret_barrier` it reads dst into smem by TMA, adds there and writes
    it back, and waits for the write; race-free where no other warpgroup of the program adds to
    the same elements meanwhile (the interpreter runs a grid's programs one at a time). The TMA
    reduction itself is checked only on a GPU.
    """
    if interpret_barrier is None:
        smem[...] = value
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem, dst, reduction_op="add")
        return
    plgpu.copy_gmem_to_smem(dst, smem, interpret_barrier)
    plgpu.barrier_wait(interpret_barrier)
    smem[...] = smem[...] + value
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem, dst)
    plgpu.wait_smem_to_gmem(0)
