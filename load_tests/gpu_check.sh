#!/usr/bin/env bash
# One prepared command for a task lent a CUDA GPU (step timeouts sum to 9.5 minutes):
#   1. nvidia-smi and the torch/triton versions
#   2. the gpu-marked tests:            pytest -m gpu tests/kernels tests/engine
#                                       (Triton kernels; the whole engine in fp32/fp16/bf16 on
#                                       CUDA against the CPU fp32 engine, mixed rows == solo)
#   3. the SGMV kernel micro-benchmark: shrink/expand vs the torch path, GB/s and the share of
#                                       the card's memory bandwidth (bench_gpu_kernels.py)
#   4. CUDA graphs against eager steps: bench_cuda_graphs.py (bf16, both bases, batch 1/8/32,
#                                       no adapter / 32 LoRA / 32 LoRA+DEU: ms per step, ratio)
#   5. the decode-step roofline on CUDA: bench_roofline.py --device cuda (bf16, both bases:
#                                       step vs the sum of its isolated GEMMs, adapter overhead)
#   6. the offline engine on the GPU:   bench_offline.py --device cuda --dtype float16
#   7. bench_offline.py --smoke         (the script itself pins the CPU; checks it still runs)
# Each step has its own timeout; a failing step is reported and the others still run; the exit
# status is non-zero if any step failed. Logs and JSON go to $OUT (default load_tests/results/gpu).
#
#   bash load_tests/gpu_check.sh              # on the GPU machine
#   bash load_tests/gpu_check.sh --dry-run    # anywhere: print the plan, import-check, parse args
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
OUT_DIR=${OUT:-load_tests/results/gpu}

STEPS=(
  "160 pytest_gpu       $PY -P -m pytest -m gpu tests/kernels tests/engine -q -p no:cacheprovider"
  "70  kernels          $PY load_tests/bench_gpu_kernels.py --json $OUT_DIR/gpu_kernels.json"
  "120 cuda_graphs      $PY load_tests/bench_cuda_graphs.py --json $OUT_DIR/cuda_graphs.json"
  "100 roofline_gpu     $PY load_tests/bench_roofline.py --device cuda --dtypes bfloat16 --json $OUT_DIR/roofline_gpu.json"
  "80  offline_gpu      $PY load_tests/bench_offline.py --device cuda --dtype float16 --skip-peft --json $OUT_DIR/offline_gpu.json"
  "40  offline_smoke    $PY load_tests/bench_offline.py --smoke --skip-peft"
)

if [[ $DRY == 1 ]]; then
  echo "gpu_check.sh --dry-run: python $PY, results to $OUT_DIR; would run (timeout s, name, command):"
  for s in "${STEPS[@]}"; do echo "  $s"; done
  set -e
  $PY load_tests/bench_gpu_kernels.py --dry-run
  $PY load_tests/bench_gpu_kernels.py --help > /dev/null
  $PY load_tests/bench_roofline.py --help > /dev/null
  $PY load_tests/bench_cuda_graphs.py --help > /dev/null
  # -P: the checkout root stays off sys.path (its kernels/ would shadow Hugging Face's kernels)
  $PY -P -c "import hotlora.kernels.lora, hotlora.kernels.deu, hotlora.kernels.attention, hotlora.server.engine.cuda_graphs; print('imports ok')"
  echo "gpu_check.sh --dry-run: ok"
  exit 0
fi

mkdir -p "$OUT_DIR"
start=$SECONDS
failed=()
{
  nvidia-smi || echo "nvidia-smi not available"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} 2>&1 | tee "$OUT_DIR/device.txt"

for s in "${STEPS[@]}"; do
  read -r limit name cmd <<< "$s"
  echo "=== $name (limit ${limit}s): $cmd"
  t0=$SECONDS
  # shellcheck disable=SC2086  # cmd is word-split on purpose
  timeout "$limit" $cmd 2>&1 | tee "$OUT_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - t0)) s"
  [[ $rc == 0 ]] || failed+=("$name($rc)")
done

echo "gpu_check.sh: done in $((SECONDS - start)) s; results in $OUT_DIR"
if (( ${#failed[@]} )); then
  echo "gpu_check.sh: FAILED steps: ${failed[*]}"
  exit 1
fi
echo "gpu_check.sh: all steps passed"
