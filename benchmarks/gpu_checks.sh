#!/usr/bin/env bash
# The GPU measurements issue 9 asks for, as one prepared run for a lent device (see docs/benchmarks.md):
#   1. profiling throughput in bf16 at Qwen1.5-MoE width (targets: >= 0.9x the plain forward,
#      >= 5x an all-experts observer at N/top-k >= 8)
#   2. apply's peak CPU RAM and GPU memory against the checkpoint bytes (target <= 1.2x)
#   3. the paper grid's per-stage cost on Qwen1.5-MoE-A2.7B at full width and depth, extrapolated to
#      37 cells (target <= 4 h on one 80 GB GPU)
#   5. (STEPS=stream) full-depth Qwen1.5-MoE-A2.7B streamed from disk one layer at a time onto the GPU, its memory
#      capped to a quarter of the model's bytes (torch.cuda.set_per_process_memory_fraction): wall, bytes read,
#      peak GPU memory per stage (docs/streaming.md)
#   4. the recovery stage (router-kd and merge, docs/recovery.md) at the published Qwen1.5-MoE-A2.7B and
#      DeepSeek-MoE-16B widths, 4 and 8 MoE layers, extrapolated to full depth: time per mask and peak GPU
#      memory against the checkpoint bytes (target <= 1.3x + activations)
# Each step has its own time limit and writes its table under $OUT as soon as it ends, so a step that
# runs out of time still leaves the others' results. Under a 10-minute limit per command (the lent
# device's), run it as two calls:
#
#   STEPS="speed memory" bash benchmarks/gpu_checks.sh     # <= 5 min; OUT defaults to benchmarks/out
#   STEPS=grid bash benchmarks/gpu_checks.sh               # <= 9 min (builds and saves a 28.6 GB model)
#   STEPS=recover bash benchmarks/gpu_checks.sh            # <= 9 min
#   STEPS=stream bash benchmarks/gpu_checks.sh             # <= 9 min: writes a 28.6 GB checkpoint (STREAM_DIR),
#                                                          # profiles and evaluates it streamed with the GPU's
#                                                          # memory capped to a quarter of the model
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
STEPS="${STEPS:-speed memory grid}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"

run_step() {  # name, limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  local start=$SECONDS
  timeout --signal=INT "$limit" "$@" >"$OUT/$name.txt" 2>"$OUT/$name.log"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.txt"
}

"$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" 2>/dev/null | tee "$OUT/summary.txt" \
  || { echo "no CUDA device: these checks need one" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUT/summary.txt" 2>&1

for step in $STEPS; do
  case $step in
    speed) run_step speed 150 "$PYTHON" benchmarks/profile_speed.py --device cuda --dtype bfloat16 --width 2048 \
             --no-memory ;;
    memory) run_step memory 150 "$PYTHON" benchmarks/apply_memory.py --width 2048 --layers 4 \
              --modes apply model-free ;;
    grid) run_step grid 540 "$PYTHON" benchmarks/paper_scale.py --models qwen1.5-moe-a2.7b --device cuda \
            --dtype bfloat16 --layers 24 --samples 32 --batch-size 4 --recon-samples 8 --retain 0.5 \
            --methods expert-sparsity tb-coverage --ppl-windows 4 --limit 50 --eval-batch-size auto \
            --json "$OUT/grid.json" ;;
    recover) run_step recover 540 "$PYTHON" benchmarks/paper_scale.py --models qwen1.5-moe-a2.7b deepseek-moe-16b \
               --device cuda --dtype bfloat16 --layers 4 8 --samples 8 --batch-size 4 --recon-samples 2 \
               --retain 0.5 --methods frequency --recover router-kd merge --recover-samples 16 --ppl-windows 1 \
               --limit 4 --eval-batch-size auto --json "$OUT/recover.json" ;;
    stream) run_step stream 540 "$PYTHON" benchmarks/out_of_core.py --gpu --gpu-fraction 0.25 --windows 4 \
              --dir "${STREAM_DIR:-/tmp/moeprune-ooc}" --out "$OUT/stream.json" ;;
    *) echo "unknown step $step (speed, memory, grid, recover, stream)" >&2; exit 2 ;;
  esac
done
