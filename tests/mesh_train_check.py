"""--mesh dp=2,sp=4 on 8 host CPU devices equals one device: losses as JSON (test_parallel.py).

    .venv/bin/python tests/mesh_train_check.py

It sets up its 8 host devices itself (XLA_FLAGS, JAX_PLATFORMS=cpu) unless they are set.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import host_devices  # noqa: F401  (8 host CPU devices, set up before jax is imported)

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
