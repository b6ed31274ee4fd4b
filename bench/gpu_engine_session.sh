#!/usr/bin/env bash
# One batched GPU-machine session for the engine-side acceptance runs (no Ray needed):
# GPU tests (engine, model, kernels natively), offline throughput vs transformers, fp8 KV, KV transfer, swap.
# Usage on the device machine, from the repo root:  bash bench/gpu_engine_session.sh "$OUT"
set -u
out=${1:-bench/results}
mkdir -p /tmp/pp "$out" && ln -sfn "$PWD" /tmp/pp/baton
export PYTHONPATH=/tmp/pp PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/workers/test_engine_gpu.py \
  tests/workers/test_model_vs_hf.py -s 2>&1 | grep -vE "^\s*$|Writing|Loading" | tail -25 | tee "$out/gpu_tests.log"
timeout 170 python3 bench/engine_throughput.py --out "$out" 2>&1 | grep -v Warn | tail -4
timeout 90 python3 bench/fp8_kv.py --prompts 32 --out "$out" 2>&1 | tail -4
python3 -c "import sys; sys.path.insert(0,'tests'); from tiny_models import build_model_dir; build_model_dir('/tmp/tiny')" >/dev/null 2>&1
timeout 100 python3 -m bench.kv_transfer --device cuda --iters 5 --model /tmp/tiny --out "$out/kv_transfer.json" 2>&1 | tail -6
timeout 60 python3 bench/swap.py --blocks 16 64 256 1024 --repeats 3 --out "$out" 2>&1 | tail -6
ls -la "$out"
