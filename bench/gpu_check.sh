#!/usr/bin/env bash
# The GPU path in one command (issue 13), at most about 8 minutes on one GPU:
#   1. pytest -m gpu: a bf16 step is finite and close to fp32, CUDA eval equals CPU eval, a 1-process NCCL group trains;
#   2. bench/step_cost.py --arch vit_b32 --batch 128 --device cuda: images/s, peak GiB and MFU per recipe;
#   3. bench/eval_speed.py --device cuda: AutoAttack and clean-eval throughput.
# Prints one summary table at the end. Usage: bench/gpu_check.sh   (PYTHON=... to choose the interpreter)
set -u
cd "$(dirname "$0")/.."
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"  # tests/conftest.py hides GPUs unless this is set
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
LOG="${GPU_CHECK_LOG:-$(mktemp -d)}"; mkdir -p "$LOG"
"$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: no CUDA device visible (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES)"; exit 2; }
GPU="$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")"

timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py >"$LOG/pytest.txt" 2>&1; RC_T=$?
timeout 240 "$PY" bench/step_cost.py --arch vit_b32 --batch 128 --device cuda --reps 5 --json "$LOG/step.json" >"$LOG/step.txt" 2>&1; RC_S=$?
timeout 150 "$PY" bench/eval_speed.py --device cuda --n 8 --clean-n 5000 --skip-ranks >"$LOG/eval.txt" 2>&1; RC_E=$?

echo "== GPU check: $GPU, $(date -u +%Y-%m-%d) (logs in $LOG) =="
printf '%-28s %s\n' "pytest -m gpu (rc $RC_T)" "$(tail -n 1 "$LOG/pytest.txt")"
echo "step_cost vit_b32 batch 128 (rc $RC_S):"
printf '  %-10s %12s %10s %10s %8s\n' recipe ms/step img/s peakGiB MFU
grep -E '^[a-z_]+ +[0-9.]+ ms/step' "$LOG/step.txt" | while read -r line; do
  name=$(awk '{print $1}' <<<"$line"); ms=$(awk '{print $2}' <<<"$line")
  ips=$(grep -oE '[0-9.]+ img/s' <<<"$line" | awk '{print $1}')
  mem=$(grep -oE 'peak [0-9.]+ GiB' <<<"$line" | awk '{print $2}')
  mfu=$(grep -oE 'MFU [0-9.]+%' <<<"$line" | awk '{print $2}')
  printf '  %-10s %12s %10s %10s %8s\n' "$name" "$ms" "${ips:--}" "${mem:--}" "${mfu:--}"
done
echo "eval_speed (rc $RC_E):"
sed 's/^/  /' "$LOG/eval.txt" | grep -E 'autoattack|clean eval' || tail -n 3 "$LOG/eval.txt"
[ $RC_T -eq 0 ] && [ $RC_S -eq 0 ] && [ $RC_E -eq 0 ]
