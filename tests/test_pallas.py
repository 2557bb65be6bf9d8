"""The fused Pallas kernels: the shared suite, in the interpreter on CPU and natively on GPU.

On CPU the kernels run with CHUNKATTN_PALLAS_INTERPRET=1 (the Pallas interpreter) at small
sizes and small blocks, so tails, multiple blocks and every phase of the loops are exercised.
Requests the kernels do not implement (dense bias/mask, mask_fn, score_fn, dropout) raise
NotImplementedError naming the feature; the suite skips those cases with that reason.
"""

from __future__ import annotations

import jax
import pytest
from attention_suite import AttentionSuite

import chunkattn
from chunkattn import testing
from chunkattn.pallas import PallasConfig

ON_GPU = jax.default_backend() == "gpu"


@pytest.fixture(autouse=True)
def _interpret_on_cpu(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("CHUNKATTN_PALLAS_INTERPRET", "1")


@pytest.mark.skipif(ON_GPU, reason="the interpreter suite is for CPU; TestPallasGPU runs on GPU")
class TestPallasInterpret(AttentionSuite):
    implementation = "pallas"
    config = PallasConfig(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
    may_decline = True
    mask_shapes = ((19, 41),)
    # Interpreting is slow: the lengths, masks, fully-masked rows and dtypes cover the kernels;
    # these add nothing kernel-specific at interpreter speed.
    test_long_unequal = test_vmap = test_no_retrace = test_large_logits_f16 = None


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
class TestPallasGPU(AttentionSuite):
    implementation = "pallas"
    config = None  # the heuristic block sizes, as users get them
    may_decline = True


def test_config_is_validated():
    for kwargs, field in [
        ({"block_q": 24}, "block_q"),
        ({"block_k_bwd": 8}, "block_k_bwd"),
        ({"num_warps": 3}, "num_warps"),
        ({"num_stages": 0}, "num_stages"),
    ]:
        with pytest.raises(ValueError, match=f"PallasConfig.{field}"):
            PallasConfig(**kwargs)


def test_declines_what_it_does_not_implement_and_auto_falls_back():
    q, k, v = testing.random_qkv(jax.random.PRNGKey(0), seq_q=16, seq_k=16, head_dim=16)
    with pytest.raises(NotImplementedError, match="mask_fn"):
        chunkattn.dot_product_attention(
            q, k, v, implementation="pallas", mask_fn=lambda b, h, i, j: i >= j
        )
    with pytest.raises(NotImplementedError, match="PallasConfig"):
        chunkattn.dot_product_attention(
            q, k, v, implementation="pallas", config=chunkattn.ChunkConfig(8, 8)
        )
