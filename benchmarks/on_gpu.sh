#!/usr/bin/env bash
# The CUDA tests and the GPU benchmarks in one go, each stage time-boxed so that one stuck stage costs no other.
#   bash benchmarks/on_gpu.sh OUT_DIR [STAGE ...]   (on a GPU machine without a registry, install carried wheels first)
# Without stage names it runs the default set in one 10-minute call (each stage is cut to what is left of
# ON_GPU_SECONDS, default 540);
# `all` runs every stage (their limits add up to about 26 minutes: more than one call; name the stages instead). Stage times go to OUT_DIR/stages.txt; logs and results (CSV/JSON,
# the card named inside) to OUT_DIR/results.tgz (one file: some GPU hosts return only a few). Stores stay under $TMPDIR or /tmp.
set -u
out=${1:?usage: on_gpu.sh OUT_DIR [STAGE ...]}
shift
# the default: issue 11's open question first, cookbook.fused_norm (compute.fused_norm) against PyTorch's ops, per
# block (kernels_bf16), in five-epoch K=64 runs and in single runs, then the CUDA tests and where the step's time goes
default="kernels_bf16 stacked_fusednorm_5ep stacked_fused_5ep tests train_fusednorm profile_step_fusednorm"
everything="kernels_bf16 stacked_fusednorm_5ep stacked_fused_5ep tests train_fusednorm profile_step_fusednorm profile_step fused_tiles \
stacked_fastest_5ep stacked_fused_bf16 stacked_fusednorm_bf16 kernels_fp32 stacked_fused_fp32 kernel_build train_speed \
stacked_hybrid_bf16 stacked_hybrid_5ep stacked_grouped_bf16 stacked_gemm_bf16 stacked_hybrid_fp32 stacked_nondet reference"
wanted=" ${*:-$default} "
[ "$wanted" = " all " ] && wanted=" $everything "
for name in $wanted; do
  case " $everything " in *" $name "*) ;; *) echo "error: no stage '$name'; choose from: all $everything" >&2; exit 2;; esac
done
work=${TMPDIR:-/tmp}/cookbook-gpu
res=$work/results
rm -rf "$res"  # an earlier call's files must not pass for this call's results
mkdir -p "$out" "$res"
export MLFLOW_TRACKING_URI=sqlite:///$work/mlflow.db COOKBOOK_SPOOL_DIR=$work/spool
budget=${ON_GPU_SECONDS:-540}  # for the whole script: a device call allows 600 s, and on-device.sh installs first
stage() {  # stage NAME SECONDS COMMAND...: if wanted, run it (within what is left of the budget), log it, note its time
  local name=$1 limit=$2; shift 2
  case "$wanted" in *" $name "*) ;; *) return 0;; esac
  local started=$SECONDS left=$((budget - SECONDS))
  if [ "$left" -lt 20 ]; then echo "$name skipped: ${left}s of the ${budget}s budget left" | tee -a "$out/stages.txt"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" > "$res/$name.log" 2>&1
  echo "$name rc=$? $((SECONDS - started))s" | tee -a "$out/stages.txt"
  tail -n 16 "$res/$name.log"
  tar -czf "$out/results.tgz" -C "$res" .  # after every stage: a stopped script still returns what it measured
}
stacked() {  # stacked NAME SECONDS ARGS...: full-MNIST stacked runs per hour
  local name=$1 limit=$2; shift 2
  stage "$name" "$limit" python3 -m benchmarks.stacked_speed --device cuda --train-subset 60000 --test-subset 10000 \
    --separate-up-to 1 --repeats 1 --out "$res" "$@"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$res/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__,
  torch.cuda.get_device_name())" >> "$res/gpu.txt" 2>&1
cat "$res/gpu.txt"
stage kernels_bf16 60 python3 -m benchmarks.kernel_speed --device cuda --precision bf16 --members 64 --out "$res"
stacked stacked_fusednorm_5ep 90 --precision bf16 --stacked-conv fused --fused-norm --ks 1,64 --epochs 5 \
  --out "$res/five-epochs"
stacked stacked_fused_5ep 90 --precision bf16 --stacked-conv fused --ks 1,64 --epochs 5 --out "$res/five-epochs"  # same card
stage tests 180 python3 -m pytest -v -rA -p no:cacheprovider tests/test_gpu.py tests/test_gpu_system.py  # -v: a verdict per line
stage train_fusednorm 90 python3 -m benchmarks.train_speed --device cuda --modes ours,ours-fusednorm --epochs 2 --repeats 1 \
  --out "$res/fusednorm"  # single runs, fp32: layernorm's 0.4 s per epoch target
stage profile_step_fusednorm 60 python3 -m benchmarks.profile_step --device cuda --members 64 --precision bf16 \
  --fused-norm --out "$res"
stage profile_step 60 python3 -m benchmarks.profile_step --device cuda --members 64 --precision bf16 --out "$res"  # where the step goes
stage fused_tiles 110 python3 -m benchmarks.fused_tiles --precision bf16 --members 64 --out "$res"  # which tiling next
case "$wanted" in *" stacked_fastest_5ep "*)  # each conv block's fastest kind in kernels_bf16's table, end to end
  fastest=$(python3 -m benchmarks.kernel_speed --fastest "$res/kernel_speed-cuda-bf16-k64.csv" 2>> "$res/fastest.log")
  echo "fastest per conv block: ${fastest:-none (no kernels_bf16 table)}" | tee -a "$out/stages.txt"
  [ -n "$fastest" ] && stacked stacked_fastest_5ep 90 --precision bf16 --stacked-conv "$fastest" --ks 1,64 --epochs 5 \
    --out "$res/five-epochs";;
esac
stacked stacked_fused_bf16 100 --precision bf16 --stacked-conv fused --ks 1,4,16,64,128 --epochs 2
stacked stacked_fusednorm_bf16 100 --precision bf16 --stacked-conv fused --fused-norm --ks 1,4,16,64,128 --epochs 2
stage kernels_fp32 45 python3 -m benchmarks.kernel_speed --device cuda --precision fp32 --members 64 --out "$res"
stacked stacked_fused_fp32 80 --precision fp32 --stacked-conv fused --ks 1,16,64 --epochs 2
stage kernel_build 30 python3 -m benchmarks.kernel_build --arch 90  # registers and spills with the device's Triton
stage train_speed 100 python3 -m benchmarks.train_speed --device cuda --modes ours,ours-eager,ours-nondet,ours-bf16,ours-nchw \
  --epochs 2 --repeats 1 --out "$res"
stacked stacked_hybrid_bf16 90 --precision bf16 --stacked-conv hybrid --ks 1,4,16,64,128 --epochs 2
stacked stacked_hybrid_5ep 75 --precision bf16 --stacked-conv hybrid --ks 1,64 --epochs 5 --out "$res/five-epochs"
for conv in grouped gemm; do stacked "stacked_${conv}_bf16" 45 --precision bf16 --stacked-conv $conv --ks 1,64 --epochs 2; done
stacked stacked_hybrid_fp32 100 --precision fp32 --stacked-conv hybrid --ks 1,4,16,64,128 --epochs 2
stacked stacked_nondet 35 --precision bf16 --ks 1,64 --epochs 2 --nondeterministic
stage reference 45 python3 -m benchmarks.train_speed --device cuda --configs batchnorm --modes reference \
  --epochs 2 --repeats 1 --out "$res/reference"  # its 2nd epoch, like ours: no first-use costs on either side
