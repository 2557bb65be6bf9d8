#!/usr/bin/env bash
# The open GPU work in device calls of ≤ 10 minutes each, most important first (bench/NOTES.md).
#
#   bash bench/gpu_session.sh verify  OUT   # ~6 min: the in-kernel features compiled by Triton
#   bash bench/gpu_session.sh speed   OUT   # ~8 min: split vs atomic backward, decode, peers
#   bash bench/gpu_session.sh memory  OUT   # ≤10 min: the memory sweep 1k..1M (issue #4)
#
# Each step has its own time limit so one hang does not take the call; results land in OUT
# (the device tool's $OUT), to be committed under bench/results/ with NOTES.md entries.
set -u
part=${1:?verify | speed | memory}
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
*)
    echo "unknown part $part: verify | speed | memory" >&2
    exit 2
    ;;
esac
