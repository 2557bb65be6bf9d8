"""Fused GPU kernels (Pallas). Imported lazily by `api.py`, never at `import chunkattn`."""

from chunkattn.pallas.attention import PallasConfig, attention, interpret_mode

__all__ = ["PallasConfig", "attention", "interpret_mode"]
