"""Ring attention and GPT training over 2 processes × 4 host CPU devices (issue 17).

    .venv/bin/python tests/multiprocess_check.py

launches the 2 processes on localhost and prints process 0's results as one JSON line
(tests/test_parallel.py launches them itself). Each process is one JAX controller, as on a
GPU cluster or a TPU pod: it asks for 4 host CPU devices (XLA_FLAGS, before jax is
imported), joins the others with `jax.distributed.initialize` (CPU collectives over gloo), and
runs the same program on a mesh over all 8 devices. Process 0 also computes the answers on
one local device, and reports the differences:

    .venv/bin/python tests/multiprocess_check.py --process-id 0 --coordinator localhost:PORT
    .venv/bin/python tests/multiprocess_check.py --process-id 1 --coordinator localhost:PORT
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

PROCESSES = 2
LOCAL_DEVICES = 4  # host CPU devices per process
TIMEOUT_S = 300  # for the whole run; a healthy one takes well under a minute


def free_port() -> int:
    """A localhost port nobody listens on now (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    """The environment without a device set-up: each process makes its own host devices."""
    return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes of `procs`; when one fails (the others would wait for it) or the time is up,
    the rest are killed."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    return [p.wait() for p in procs]


def launch() -> int:
    """Run PROCESSES workers on localhost; print process 0's results; fail if any worker does."""
    coordinator = f"localhost:{free_port()}"
    outs = [tempfile.TemporaryFile("w+") for _ in range(PROCESSES)]
    errs = [tempfile.TemporaryFile("w+") for _ in range(PROCESSES)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--process-id", str(i), "--coordinator", coordinator],
            stdout=outs[i],
            stderr=errs[i],
            text=True,
            env=worker_env(),
        )
        for i in range(PROCESSES)
    ]
    codes = wait_all(procs, TIMEOUT_S)
    for i, code in enumerate(codes):
        if code != 0:
            errs[i].seek(0)
            print(f"process {i} exited with {code}:\n{errs[i].read()}", file=sys.stderr)
    if codes != [0] * PROCESSES:
        return 1
    outs[0].seek(0)  # gloo prints its connection messages to stdout too: the JSON line only
    print([line for line in outs[0].read().splitlines() if line.startswith("{")][-1])
    return 0


def worker(process_id: int, coordinator: str) -> dict:
    """One process of the check: its results (the comparisons in process 0 only)."""
    flags = os.environ.get("XLA_FLAGS", "")  # read once, at jax's first use
    # Compiling takes nearly all the time of this check: LLVM's optimisation passes are skipped
    # (the same programs, compiled faster).
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={LOCAL_DEVICES}"
        " --xla_backend_optimization_level=0"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    # Collectives between processes' CPU devices (gloo is jax 0.10's default; no MPI needed).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=PROCESSES, process_id=process_id
    )
    results = {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "processes_of_devices": sorted({d.process_index for d in jax.devices()}),
    }
    results["attention"] = check_ring_attention()
    results["training"] = check_training()
    return results


def check_ring_attention() -> dict[str, float]:
    """Causal GQA ring attention with a window and sinks: value and gradients of a projected
    loss on the 8-device mesh, against reference_attention on one local device."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import chunkattn
    from chunkattn import testing
    from chunkattn.parallel import ring_attention

    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((jax.device_count(),), ("sp",), axis_types=auto)
    rng = np.random.default_rng(0)  # every process draws the same global arrays
    data = {
        "q": rng.standard_normal((2, 64, 4, 16), np.float32),  # (B, T, N, H)
        "k": rng.standard_normal((2, 64, 2, 16), np.float32),  # (B, S, K, H)
        "v": rng.standard_normal((2, 64, 2, 16), np.float32),  # (B, S, K, H)
        "sinks": np.array([0.5, -1.0, 2.0, 0.0], np.float32),  # (N,)
        "proj": rng.standard_normal((2, 64, 4, 16), np.float32),  # (B, T, N, H)
    }
    specs = {"q": P(None, "sp"), "k": P(None, "sp"), "v": P(None, "sp"), "sinks": P()}
    specs["proj"] = P(None, "sp")
    # Each process builds only its own devices' shards of the global arrays.
    glob = {
        name: jax.make_array_from_callback(x.shape, NamedSharding(mesh, specs[name]), x.__getitem__)
        for name, x in data.items()
    }

    def loss(attend, q, k, v, sinks, proj):
        out = attend(q, k, v, is_causal=True, local_window_size=(9, 0), sinks=sinks)
        return jnp.sum(out * proj), out

    ring = lambda q, k, v, **kw: ring_attention(
        q, k, v, mesh=mesh, axis_name="sp", config=chunkattn.ChunkConfig(4, 4), **kw
    )
    args = [glob[name] for name in ("q", "k", "v", "sinks", "proj")]
    grad = lambda attend: jax.value_and_grad(
        lambda *a: loss(attend, *a), argnums=(0, 1, 2, 3), has_aux=True
    )
    (value, out), grads = multihost_utils.process_allgather(jax.jit(grad(ring))(*args), tiled=True)
    if jax.process_index() != 0:
        return {}
    local = [data[name] for name in ("q", "k", "v", "sinks", "proj")]
    with jax.default_device(jax.local_devices()[0]):
        (want_value, want_out), want_grads = jax.jit(grad(chunkattn.reference_attention))(*local)
    errors = {
        "value": testing.relative_error(value, want_value),
        "out": testing.relative_error(out, want_out),
    }
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), grads, want_grads, strict=True):
        errors[name] = testing.relative_error(g, w)
    return errors


def _onto_mesh(x, mesh):
    """An array held by this process only, replicated over the mesh (the same value in every
    process); an array already on the mesh, as is. Every training step then runs one program
    (from a process's local arrays, the first step's inputs would differ from the others')."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if not x.is_fully_addressable:
        return x
    return jax.make_array_from_callback(
        x.shape, NamedSharding(mesh, P()), np.asarray(x).__getitem__
    )


def check_training(steps: int = 2) -> dict:
    """The losses of `steps` GPT training steps (chunkattn.train's step) on a dp=2, sp=4 mesh
    over both processes, and of the same steps on one local device (process 0)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from chunkattn import train

    text = "".join(f"line {i}: the quick brown fox\n" for i in range(100)).encode()
    data = np.frombuffer(text, np.uint8)
    common = ["--seq-len", "32", "--batch-size", "4", "--layers", "1", "--dim", "32"]
    common += ["--heads", "2", "--sinks", "--warmup", "1", "--steps", str(steps)]

    found: dict = {}

    def run(argv: list[str]) -> list[float]:
        a = train.parse_args(argv)
        _, _, _, params, tx, _, train_step, _ = train.build(a)
        opt_state = tx.init(params)
        mesh = train.make_mesh(a.mesh_shape)
        if mesh is not None:
            # The processes holding each data-parallel row of the mesh (its devices over sp).
            rows = [mesh.devices[i].flat for i in range(mesh.shape["dp"])]
            found["dp_row_processes"] = [sorted({d.process_index for d in r}) for r in rows]
            params, opt_state = jax.tree.map(
                functools.partial(_onto_mesh, mesh=mesh), (params, opt_state)
            )
        losses = []
        for step in range(steps):
            batch = train.batch_at(data, a.seed, step, a.batch_size, a.seq_len)  # (B, T+1)
            if mesh is not None:  # batch over "dp"; the attention splits the sequence over "sp"
                sharding = NamedSharding(mesh, P("dp", None))
                batch = jax.make_array_from_callback(batch.shape, sharding, batch.__getitem__)
            params, opt_state, loss = train_step(params, opt_state, batch)
            losses.append(float(loss))  # the loss is replicated: every process can read it
        return losses

    found["mesh"] = run([*common, "--mesh", "dp=2,sp=4"])
    if jax.process_index() == 0:
        with jax.default_device(jax.local_devices()[0]):
            found["single"] = run(common)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--process-id", type=int, help="run as this process (default: launch all)")
    p.add_argument("--coordinator", help="host:port of process 0's coordination service")
    a = p.parse_args(argv)
    if a.process_id is None:
        return launch()
    if a.coordinator is None:
        p.error("--process-id needs --coordinator")
    results = worker(a.process_id, a.coordinator)
    if a.process_id == 0:
        print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
