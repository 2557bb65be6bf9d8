"""--mesh dp=2,sp=4 on 8 host CPU devices equals one device: losses as JSON (test_parallel.py).

    .venv/bin/python tests/mesh_train_check.py

It sets up its 8 host devices itself (XLA_FLAGS, JAX_PLATFORMS=cpu) unless they are set.
"""

from __future__ import annotations

import os

# 8 host CPU devices, set up before jax is imported (it reads these once, at its first use), so
# that `.venv/bin/python tests/mesh_train_check.py` works as it stands; given flags are kept.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import pathlib
import sys
import tempfile

from chunkattn import train


def main() -> int:
    root = pathlib.Path(tempfile.mkdtemp())
    (root / "data.txt").write_text("".join(f"line {i}: the quick brown fox\n" for i in range(400)))
    common = [
        "--data",
        str(root / "data.txt"),
        "--steps",
        "4",
        "--seq-len",
        "64",
        "--batch-size",
        "4",
        "--layers",
        "1",
        "--dim",
        "32",
        "--heads",
        "2",
        "--log-every",
        "1",
        "--eval-every",
        "2",
        "--ckpt-every",
        "4",
        "--sample",
        "8",
    ]
    losses = {}
    for name, extra in (("single", []), ("mesh", ["--mesh", "dp=2,sp=4"])):
        out = root / name
        if name == "single":  # one device's program: pin everything to device 0
            import jax

            with jax.default_device(jax.devices()[0]):
                assert train.main([*common, "--out", str(out)]) == 0
        else:
            assert train.main([*common, *extra, "--out", str(out)]) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows]
    print(json.dumps(losses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
