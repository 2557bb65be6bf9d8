"""Fused FlashAttention kernels in Pallas for NVIDIA GPUs (Triton; Mosaic GPU, experimental).

Imported lazily by `api.py` and `parallel.py`, never at `import chunkattn`. One file per job,
imports one way (config -> kernel_common -> forward, backward -> block, dispatch):

- `config.py`: `PallasConfig` (validated block sizes, warps, stages, backward mode), the block
  sizes per head dim and dtype (`heuristic`), `block_width`, and `interpret_mode`
  (CHUNKATTN_PALLAS_INTERPRET=1 runs the kernels in the Pallas interpreter: the CPU tests).
- `kernel_common.py`: what the kernels share: `Static`, the `META` columns, the in-kernel
  helpers (masked loads, masks from indices, score order, block ranges, the three-phase loop)
  and the optional inputs and BlockSpecs around the pallas_calls (`segment_ranges`).
- `forward.py`: the forward kernel (output and log-sum-exp) and its pallas_call.
- `backward.py`: the dK/dV kernel (looping over query blocks; with backward="atomic" it also
  adds dQ), the dQ kernel (looping over key blocks), and the dense bias's gradient.
- `mosaic.py` (experimental, `implementation="pallas_mosaic"`): the Hopper forward kernel in
  Pallas Mosaic GPU (wgmma, TMA, warp specialisation), `MosaicConfig`, and its parts as
  functions checkable on the CPU; `mosaic_compat.py`: the plgpu API differences of jax 0.10,
  0.11 and 0.12. Its backward is the Triton kernels' unless `MosaicConfig(backward=
  MosaicBackwardConfig())` picks `mosaic_backward.py` (experimental): the Mosaic GPU dK/dV
  and dQ kernels.
- `block.py`: the kernels' block contract, beside `chunked.block_forward` / `block_backward`:
  one query block against one key block at global positions folded into `META` (ring
  attention runs it per ring step on a GPU).
- `user_fns.py`: whether a user's mask_fn/score_fn can be traced into a kernel body (no
  captured arrays, only primitives the lowering has; for Mosaic GPU, by operand dtype too),
  and which of its arguments it reads; `mosaic.py` and the TPU kernels (tpu_flash.py) use it
  too.
- `dispatch.py`: the custom_vjp `flash_attention`, the checks of a user's mask_fn/score_fn,
  and `attention(args, opts, kernel)`, the entry `api.py` calls.
"""

from chunkattn.pallas.config import PallasConfig, interpret_mode
from chunkattn.pallas.dispatch import attention
from chunkattn.pallas.mosaic import MosaicConfig
from chunkattn.pallas.mosaic_backward import MosaicBackwardConfig

__all__ = ["MosaicBackwardConfig", "MosaicConfig", "PallasConfig", "attention", "interpret_mode"]
