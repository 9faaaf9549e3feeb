#!/usr/bin/env bash
# The prepared GPU check: one command for a session that has a CUDA device (about 5 minutes on one GPU).
#
#   bash benchmarks/gpu_check.sh            # writes benchmarks/gpu_results/<date>/*.txt
#
# 1. the tests marked `gpu`: the fp16/bf16/autocast loss matrix on CUDA (every registered loss, batch 1 and 6),
#    fp16 (GradScaler) and bf16 training of every scheme recipe on the Accelerate loop, a bf16 teacher and a
#    cached-teacher step; `kd-tasks detect` under MMEngine's AmpOptimWrapper with distillation terms; `kd-tasks nlp --fp16`;
# 2. the KD step ratios of benchmarks/kd_step_overhead.py on the device, fp32 and bf16 (KD step over student
#    step + teacher forward; resnet50 -> resnet18, batch 64 of 224x224).
# Without a CUDA device it says so and runs the CPU part: the same loss matrix on the CPU and a short CPU ratio.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/gpu_results/$(date +%Y-%m-%d)}
mkdir -p "$OUT"
status=0
if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  $PY -c "import torch; print(torch.cuda.get_device_name(0), torch.version.cuda, torch.__version__)" | tee "$OUT/device.txt"
  $PY -m pytest -q -p no:cacheprovider -m gpu tests/shared/test_precision.py tests/test_gpu.py \
      tests/detection/test_detection_gpu.py tests/nlp/test_mixed_precision.py 2>&1 | tail -n 30 | tee "$OUT/pytest_gpu.txt" || status=1
  for dtype in fp32 bf16; do
    $PY benchmarks/kd_step_overhead.py --device cuda --dtype "$dtype" --batch 64 --size 224 --reps 20 2>&1 \
      | tee "$OUT/kd_step_cuda_$dtype.txt" || status=1
  done
else
  echo "no CUDA device here: running the CPU part only" | tee "$OUT/device.txt"
  $PY -m pytest -q -p no:cacheprovider tests/shared/test_precision.py 2>&1 | tail -n 5 | tee "$OUT/pytest_cpu.txt" || status=1
  $PY benchmarks/kd_step_overhead.py --dtype bf16 --batch 8 --size 64 --reps 5 --threads 2 2>&1 \
    | tee "$OUT/kd_step_cpu_bf16.txt" || status=1
fi
echo "results in $OUT"
exit $status
