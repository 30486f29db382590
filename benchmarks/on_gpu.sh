#!/usr/bin/env bash
# The CUDA tests and the GPU benchmarks in one go, each stage time-boxed so that one stuck stage costs no other.
#   bash benchmarks/on_gpu.sh OUT_DIR        (on a GPU machine without a registry: bash .whl/on-device.sh bash benchmarks/on_gpu.sh OUT)
# Logs and results (CSV/JSON, the card named inside) land in OUT_DIR; stores and artifacts stay under /tmp.
set -u
out=${1:?usage: on_gpu.sh OUT_DIR}
mkdir -p "$out/results"
export MLFLOW_TRACKING_URI=sqlite:////tmp/cookbook-gpu/mlflow.db COOKBOOK_SPOOL_DIR=/tmp/cookbook-gpu/spool
mkdir -p /tmp/cookbook-gpu
stage() {  # stage NAME SECONDS COMMAND...: run it, log it, note its exit status and time
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$? $((SECONDS - started))s" | tee -a "$out/stages.txt"
  tail -n 25 "$out/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" >> "$out/gpu.txt"
cat "$out/gpu.txt"
stage tests 140 python3 -m pytest -q -rA -p no:cacheprovider tests/test_gpu.py tests/test_gpu_system.py
stage train_speed 95 python3 -m benchmarks.train_speed --device cuda --modes ours,ours-eager,ours-nondet,ours-bf16 \
  --epochs 2 --repeats 1 --out "$out/results"
stage stacked_bf16 95 python3 -m benchmarks.stacked_speed --device cuda --precision bf16 --ks 1,4,16,64,128 \
  --train-subset 60000 --test-subset 10000 --epochs 2 --separate-up-to 1 --repeats 1 --out "$out/results"
stage stacked_fp32 100 python3 -m benchmarks.stacked_speed --device cuda --precision fp32 --ks 1,4,16,64,128 \
  --train-subset 60000 --test-subset 10000 --epochs 2 --separate-up-to 1 --repeats 1 --out "$out/results"
stage reference 35 python3 -m benchmarks.train_speed --device cuda --configs batchnorm --modes reference \
  --epochs 1 --repeats 1 --out "$out/results/reference"
stage stacked_nondet 25 python3 -m benchmarks.stacked_speed --device cuda --precision bf16 --ks 1,64 --nondeterministic \
  --train-subset 60000 --test-subset 10000 --epochs 2 --separate-up-to 1 --repeats 1 --out "$out/results"
