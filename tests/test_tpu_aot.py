"""Splash attention and our own TPU kernels (pallas_tpu) compiled for real TPU targets (v5e,
v6e) on this CPU host, with no TPU.

`jax.experimental.topologies.get_topology_desc` with libtpu installed gives deviceless TPU
devices; `jit(...).lower(...).compile()` then runs XLA's and Mosaic's whole TPU pipeline here, so
a kernel that does not fit a core's VMEM, or a layout Mosaic rejects, fails as it would on the
chip. Marked `tpu_aot` and left out of the default run (pyproject.toml); it needs the tpu
extra (libtpu at jax's version):

    .venv/bin/pip install -e ".[test,tpu]"
    .venv/bin/python -m pytest -m tpu_aot tests/test_tpu_aot.py

Run on 2026-12-01 with jax 0.10.2 and libtpu 0.0.42.1: all 8 splash cases compile (4.5 minutes on
2 cores). On 2026-12-02: the 8 pallas_tpu cases compile too (forward, dK/dV, dQ and d bias; about
2.5 minutes), and the 2 with a mask_fn and score_fn traced into the kernels (1.7 minutes).
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import chunkattn
from chunkattn.models.gpt import GPT, GPTConfig

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.skipif(
        importlib.util.find_spec("libtpu") is None,
        reason="needs libtpu: pip install -e '.[tpu]'",
    ),
]

TOPOLOGIES = ("v5e:2x2", "v6e:2x2")


def _device(topology: str):
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]


def _abstract(tree, device):
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


FEATURES = {
    "causal_gqa": dict(is_causal=True),
    "window_sinks_soft_cap": dict(
        local_window_size=(512, 0), sinks=jnp.zeros((8,)), logits_soft_cap=30.0
    ),
    "segments_lengths": dict(
        segment_ids=jnp.repeat(jnp.arange(4), 512)[None].repeat(2, 0),
        key_value_seq_lengths=jnp.array([2048, 1500]),
    ),
}


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("name", list(FEATURES))
def test_attention_forward_and_backward_compile(topology, name, monkeypatch):
    monkeypatch.delenv("CHUNKATTN_PALLAS_INTERPRET", raising=False)
    device = _device(topology)
    q = jax.ShapeDtypeStruct((2, 2048, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 2048, 2, 128), jnp.bfloat16)
    kw = FEATURES[name]

    def step(q, k, v):
        loss = lambda q, k, v: jnp.sum(
            chunkattn.dot_product_attention(q, k, v, implementation="splash", **kw).astype(
                jnp.float32
            )
            ** 2
        )
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    compiled = jax.jit(step).lower(*_abstract((q, kv, kv), device)).compile()
    assert compiled.as_text().count("tpu_custom_call") >= 2, "the forward and backward kernels"
    assert compiled.memory_analysis() is not None


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_gpt_train_step_with_splash_compiles(topology, monkeypatch):
    """The GPT's forward+backward with attention="splash" (bf16, GQA, sinks) for a TPU."""
    monkeypatch.delenv("CHUNKATTN_PALLAS_INTERPRET", raising=False)
    device = _device(topology)
    cfg = GPTConfig(
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        dim=1024,
        max_seq_len=2048,
        attention="splash",
        sinks=True,
        dtype=jnp.bfloat16,
    )
    graph, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(params, tokens):
        logits = nnx.merge(graph, params)(tokens[:, :-1])
        return jnp.mean(
            -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)
        )

    tokens = jax.ShapeDtypeStruct((4, 2049), jnp.int32)
    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(*_abstract((params, tokens), device)).compile()
    assert compiled.as_text().count("tpu_custom_call") >= 2 * cfg.num_layers


# Our own kernels (chunkattn/tpu_flash.py) at their default blocks (forward 512 x 512, backward
# 256 x 256): what splash cannot serve. Arrays are made abstract too (bias, mask, segments).
TPU_FLASH_FEATURES = {
    "bias_full_causal": dict(
        bias=jax.ShapeDtypeStruct((2, 8, 2048, 2048), jnp.bfloat16), is_causal=True
    ),
    "bias_heads_keys_mask_rows": dict(
        bias=jax.ShapeDtypeStruct((1, 8, 1, 2048), jnp.float32),
        mask=jax.ShapeDtypeStruct((2, 1, 2048, 2048), jnp.bool_),
    ),
    "dropout_window_sinks_cap": dict(
        dropout_rate=0.1,
        broadcast_dropout=False,
        local_window_size=(512, 0),
        sinks=jax.ShapeDtypeStruct((8,), jnp.float32),
        logits_soft_cap=30.0,
    ),
    "segments_lengths_offsets_f32": dict(
        segment_ids=jax.ShapeDtypeStruct((2, 2048), jnp.int32),
        key_value_seq_lengths=jax.ShapeDtypeStruct((2,), jnp.int32),
        q_offset=jax.ShapeDtypeStruct((2,), jnp.int32),
        is_causal=True,
        dtype=jnp.float32,
    ),
    # Traced into all four kernels: a position-only mask_fn and an ALiBi-like score_fn (with
    # its jvp in the backward) at global positions, with a per-head bias and causal.
    "mask_fn_score_fn_bias_causal": dict(
        mask_fn=lambda b, h, i, j: (j % 3 != 0) | (i == j),
        score_fn=lambda s, b, h, i, j: (
            s - (0.5 / (h + 1).astype(jnp.float32)) * jnp.abs(i - j).astype(jnp.float32)
        ),
        bias=jax.ShapeDtypeStruct((1, 8, 1, 2048), jnp.float32),
        q_offset=jax.ShapeDtypeStruct((2,), jnp.int32),
        is_causal=True,
    ),
}


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("name", list(TPU_FLASH_FEATURES))
def test_tpu_flash_forward_and_backward_compile(topology, name, monkeypatch):
    """implementation="pallas_tpu" forward + backward (bias gradient included) compiles for
    the chip: every block fits the core's VMEM and Mosaic accepts every layout."""
    monkeypatch.delenv("CHUNKATTN_PALLAS_INTERPRET", raising=False)
    device = _device(topology)
    kw = dict(TPU_FLASH_FEATURES[name])
    dtype = kw.pop("dtype", jnp.bfloat16)
    arrays = {n: kw.pop(n) for n in list(kw) if isinstance(kw[n], jax.ShapeDtypeStruct)}
    q = jax.ShapeDtypeStruct((2, 2048, 8, 128), dtype)
    kv = jax.ShapeDtypeStruct((2, 2048, 2, 128), dtype)
    differentiable = [n for n in arrays if n in ("bias", "sinks")]

    def step(q, k, v, arrays, rng):
        extra = dict(dropout_rng=rng) if "dropout_rate" in kw else {}

        def loss(q, k, v, diff):
            out = chunkattn.dot_product_attention(
                q, k, v, implementation="pallas_tpu", **arrays, **diff, **kw, **extra
            )
            return jnp.sum(out.astype(jnp.float32) ** 2)

        diff = {n: arrays.pop(n) for n in differentiable}
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, diff)

    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    compiled = jax.jit(step).lower(*_abstract((q, kv, kv, arrays, rng), device)).compile()
    kernels = 4 if "bias" in arrays else 3  # forward, dK/dV, dQ (, d bias)
    assert compiled.as_text().count("tpu_custom_call") == kernels
    assert compiled.memory_analysis() is not None
