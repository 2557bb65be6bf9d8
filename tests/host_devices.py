"""Host CPU devices for the multi-device check scripts, set up before jax is imported.

JAX reads XLA_FLAGS once, at its first use, so a script that runs as
`.venv/bin/python tests/parallel_check.py` imports this module before jax: importing it asks for
8 host devices. Flags the caller already gave are kept.
"""

from __future__ import annotations

import os


def use_host_devices(count: int = 8) -> None:
    """Ask XLA for `count` host CPU devices (unless XLA_FLAGS already sets a count)."""
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
        ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


use_host_devices(8)
