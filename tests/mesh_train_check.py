"""--mesh dp=2,sp=2,tp=2 (and with --all also dp=2,sp=4) on 8 host CPU devices equal one device.

    .venv/bin/python tests/mesh_train_check.py [--all]

test_parallel.py runs the data × sequence × tensor mesh (every axis at once); the 4-way ring
in training (dp=2,sp=4) is the same code with a longer ring, left to `--all` for CI's time
(the ring at sp = 2, 4 and 8 is checked against one device in parallel_check.py).

Prints one JSON line: the losses of each run (`chunkattn-train --sinks` with checkpoints,
validation and a sample), and, for the tensor-parallel mesh, the sharding of the projections'
kernels and the sinks and the collectives of its compiled train step. It sets up its 8 host
devices itself (XLA_FLAGS, JAX_PLATFORMS=cpu) unless they are set.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
import tempfile

import host_devices  # noqa: F401  (8 host CPU devices, set up before jax is imported)
import jax

from chunkattn import train

TP_MESH = "dp=2,sp=2,tp=2"
# 4 heads over tp=2: each device keeps two whole heads (and their sinks); T=64 divides by 2·sp
# for either mesh.
COMMON = "--steps 4 --seq-len 64 --batch-size 4 --layers 1 --dim 32 --heads 4 --sinks"
COMMON += " --log-every 1 --eval-every 2 --ckpt-every 4 --sample 8"


def tensor_parallel_layout(mesh: str) -> dict:
    """The PartitionSpecs of the kernels and sinks after train.build, and the collectives the
    step compiles to."""
    a = train.parse_args([*COMMON.split(), "--mesh", mesh])
    _, _, _, params, tx, _, train_step, _ = train.build(a)
    block = params["blocks"][0]
    kernels = {f"attn.{n}": block["attn"][n]["kernel"] for n in ("wq", "wk", "wv", "wo")}
    kernels |= {n: block[n]["kernel"] for n in ("fc", "proj")}
    kernels["attn.sinks"] = block["attn"]["sinks"]
    specs = {name: list(param[...].sharding.spec) for name, param in kernels.items()}
    mesh = train.make_mesh(a.mesh_shape)
    batch = jax.ShapeDtypeStruct(
        (a.batch_size, a.seq_len + 1), "int32", sharding=train.batch_sharding(mesh)
    )
    hlo = train_step.lower(params, tx.init(params), batch).compile().as_text()
    ops = re.findall(r"\s(all-gather|all-reduce|collective-permute|all-to-all)(?:-start)?\(", hlo)
    return {"specs": specs, "collectives": {op: ops.count(op) for op in sorted(set(ops))}}


def main() -> int:
    root = pathlib.Path(tempfile.mkdtemp())
    (root / "data.txt").write_text("".join(f"line {i}: the quick brown fox\n" for i in range(400)))
    common = [*COMMON.split(), "--data", str(root / "data.txt")]
    losses = {}
    meshes = ("dp=2,sp=4", TP_MESH) if "--all" in sys.argv[1:] else (TP_MESH,)
    for name in ("single", *meshes):
        out = root / name
        if name == "single":  # one device's program: pin everything to device 0
            with jax.default_device(jax.devices()[0]):
                assert train.main([*common, "--out", str(out)]) == 0
        else:
            assert train.main([*common, "--mesh", name, "--out", str(out)]) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows]
    print(json.dumps({"losses": losses, "tp": tensor_parallel_layout(TP_MESH)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
