#!/usr/bin/env bash
# The open GPU work in device calls of ≤ 10 minutes each, most important first (bench/NOTES.md).
#
#   bash bench/gpu_session.sh verify  OUT   # ~6 min: the in-kernel features compiled by Triton
#   bash bench/gpu_session.sh speed   OUT   # ~8 min: split vs atomic backward, decode, peers
#   bash bench/gpu_session.sh memory  OUT   # ≤10 min: the memory sweep 1k..1M (issue #4)
#   bash bench/gpu_session.sh mosaic  OUT   # ~8 min: the Mosaic GPU forward's first run (#21)
#   bash bench/gpu_session.sh mosaic_bwd OUT  # ~15 min: the Mosaic GPU backward's first run (#21)
#   bash bench/gpu_session.sh mosaic_suite OUT  # ≤9 min: the shared suite on the Mosaic kernels
#
# Each step has its own time limit so one hang does not take the call; results land in OUT
# (the device tool's $OUT), to be committed under bench/results/ with NOTES.md entries.
set -u
part=${1:?verify | speed | memory | mosaic | mosaic_bwd | mosaic_suite}
out=${2:?output folder}
mkdir -p "$out"
step() {  # step SECONDS LOGNAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $?"
    tail -25 "$out/$name.log"
}
case $part in
verify)
    step 150 check_gpu python bench/check_gpu.py
    step 240 pytest_gpu python -m pytest -q -x -m gpu tests/test_pallas.py
    ;;
speed)
    step 200 pallas_tune python bench/pallas_tune.py --seq-len 16384 --head-dim 128 \
        --backward split atomic
    step 60 decode python bench/decode.py --reps 20 --out "$out"
    step 220 speed python bench/speed.py --seq-lens 4096 16384 --mask both --reps 5 --out "$out"
    ;;
memory)
    step 590 memory python bench/memory_vs_seqlen.py --out "$out"
    ;;
mosaic)
    # Correctness first (every feature x head dim 64/128/256 x bf16/f16, forward, lse and
    # gradients through the Triton backward), then one speed row per mask against cuDNN and
    # the Triton kernels at 16k, bf16, N=16, H=128 (the goal: forward >= 1.0x cuDNN).
    step 330 pytest_mosaic python -m pytest -q -x -m gpu tests/test_mosaic.py
    step 200 speed_mosaic python bench/speed.py --seq-lens 16384 --mask both --reps 5 \
        --impls chunkattn_pallas_mosaic chunkattn_pallas jax_nn_cudnn --tag mosaic --out "$out"
    ;;
mosaic_bwd)
    # The Mosaic GPU backward (MosaicConfig(backward=MosaicBackwardConfig())), both dQ forms
    # (dq="kernel", the default, and dq="atomic": float32 TMA reduce-adds, which only a GPU
    # runs): its GPU tests (gradients against the reference; watch for a hang: each step has
    # its limit), then forward+backward at 16k, bf16, N=16, H=128 against the Triton backward
    # and cuDNN.
    step 300 pytest_mosaic_bwd python -m pytest -q -x -m gpu tests/test_mosaic.py \
        -k "backward and kernel"
    step 300 pytest_mosaic_bwd_atomic python -m pytest -q -x -m gpu tests/test_mosaic.py \
        -k "backward and atomic"
    step 300 speed_mosaic_bwd python bench/speed.py --seq-lens 16384 --mask both --reps 5 \
        --impls chunkattn_pallas_mosaic_bwd chunkattn_pallas_mosaic_bwd_atomic \
        chunkattn_pallas_mosaic chunkattn_pallas jax_nn_cudnn --tag mosaic_bwd --out "$out"
    ;;
mosaic_suite)
    # The shared correctness suite (tests/attention_suite.py) on pallas_mosaic: the Mosaic
    # backward with dq="kernel", with dq="atomic", then the default Triton backward.
    step 180 pytest_mosaic_suite python -m pytest -q -m gpu tests/test_mosaic_suite.py \
        -k "TestMosaicGPU and not Atomic and not Triton"
    step 180 pytest_mosaic_suite_atomic python -m pytest -q -m gpu tests/test_mosaic_suite.py \
        -k TestMosaicGPUAtomicDq
    step 180 pytest_mosaic_suite_triton_bwd python -m pytest -q -m gpu \
        tests/test_mosaic_suite.py -k TestMosaicGPUTritonBackward
    ;;
*)
    echo "unknown part $part: verify | speed | memory | mosaic | mosaic_bwd | mosaic_suite" >&2
    exit 2
    ;;
esac
