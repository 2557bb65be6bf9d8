"""The shared correctness suite (`attention_suite.AttentionSuite`) on `pallas_mosaic` with the
Mosaic GPU backward: forward, lse and gradients against the float32 reference.

The kernels serve bfloat16/float16 at head dims 64, 128 and 256 (`mosaic.check_request`), so
the suite's incidental float32 inputs run in bfloat16 and its head dims below 64 at 64 (a test
that asks for a dtype keeps it: float32 and float64 are declined by name and skipped, as are
the other features the path declines: a bias, a dense mask, dropout, functions that close over
arrays). On a CPU the kernels' loops run as their jnp emulation (`mosaic.emulate`,
`mosaic_backward.emulate`; the kernels themselves are tests/test_mosaic.py's, in jax's Mosaic
GPU interpreter): dispatch, argument handling, the per-row key ranges and block schedules that
feed the kernels. On an H100/H200 (`-m gpu`) the kernels: both dQ forms of the Mosaic
backward, and the default pairing with the Triton backward.

The default run takes 25 cases over the mechanisms the kernels' inputs go through (about 50 s
of CPU: the emulation compiles its loops per case); `CHUNKATTN_MOSAIC_SUITE=full` runs the
rest too (57 cases, the mask matrix at (19, 41) only; about 2 minutes on 2 workers).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest
from attention_suite import AttentionSuite

from chunkattn.pallas import mosaic, mosaic_backward

ON_GPU = jax.default_backend() == "gpu"
MIN_HEAD_DIM = 64
FULL = os.environ.get("CHUNKATTN_MOSAIC_SUITE") == "full"


def _config(dq: str) -> mosaic.MosaicConfig:
    return mosaic.MosaicConfig(backward=mosaic_backward.MosaicBackwardConfig(dq=dq))


class _MosaicSuite(AttentionSuite):
    implementation = "pallas_mosaic"
    config = _config("kernel")
    may_decline = True

    def qkv(self, seed: int, **kwargs):
        kwargs.setdefault("dtype", jnp.bfloat16)
        for key in ("head_dim", "head_dim_v"):
            if kwargs.get(key) is not None:
                kwargs[key] = max(kwargs[key], MIN_HEAD_DIM)
        return super().qkv(seed, **kwargs)


@pytest.mark.skipif(ON_GPU, reason="the emulated suite is for CPU; TestMosaicGPU runs on GPU")
class TestMosaicEmulated(_MosaicSuite):
    mask_shapes = ((19, 41),)
    if not FULL:  # the default run: padded tails, per-row key ranges, schedules, edge rules
        length_pairs = ((257, 17),)
        mask_kinds = ("causal_offset_per_batch", "segment_pair")
        sink_kinds = ()  # sinks, soft cap, lengths alone: tests/test_mosaic.py's cases
        test_long_unequal = test_heads = test_dtypes = test_no_retrace = None
        test_sinks_on_fully_masked_rows = test_large_logits_f16 = None
        test_debug_infs_and_nans_are_clean_on_valid_input = None
        test_higher_order_derivatives_work_or_name_the_feature = None

    @pytest.fixture(autouse=True)
    def _emulated(self, monkeypatch):
        monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")  # past the GPU backend's check
        monkeypatch.setattr(mosaic, "launch", mosaic.emulate)
        monkeypatch.setattr(mosaic_backward, "launch", mosaic_backward.emulate)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (sm_90: H100/H200)")
class TestMosaicGPU(_MosaicSuite):
    pass


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (sm_90: H100/H200)")
class TestMosaicGPUAtomicDq(_MosaicSuite):
    config = _config("atomic")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (sm_90: H100/H200)")
class TestMosaicGPUTritonBackward(_MosaicSuite):
    """The default MosaicConfig: the Mosaic forward with the Triton backward, which serves
    mask_fn and score_fn (the Mosaic backward declines them)."""

    config = mosaic.MosaicConfig()
