#!/usr/bin/env bash
# snaketune vs Hugging Face Trainer + PEFT on ONE GPU, in one command, no internet needed (about 6
# minutes on one H100): both arms on a random-weight InternLM2-chat-1.8B-shaped model, 2048-token
# packed rows, bf16 compute, CUDA NF4 (bench/trainer_vs_hf.py --gpu); tokens/s, peak GPU memory, MFU.
#
# On a machine with PyPI, fetch the wheels the GPU machine lacks; copy the checkout with .whl/ to
# the GPU machine; run this there:
#     bash bench/gpu_wheels.sh                        # on the machine with PyPI: .whl/
#     OUT=gpu_out bash bench/gpu_trainer_vs_hf.sh     # on the GPU machine
# Results in $OUT (default /tmp/gpu_trainer_vs_hf_out): trainer_vs_hf_gpu.json (both arms, the
# card) and trainer_vs_hf_gpu.log (everything printed). RUNS (default 3) runs per arm, STEPS
# (default 8) optimizer steps each.
#
# Dry run on a machine without a GPU (tiny shapes, the venv's packages, nothing installed):
#     GPU_CHECK_CPU=1 PYTHON=.venv/bin/python OUT=/tmp/gpu_vs bash bench/gpu_trainer_vs_hf.sh
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-/tmp/gpu_trainer_vs_hf_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
RUNS=${RUNS:-3}
STEPS=${STEPS:-8}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

main() {
  echo "gpu_trainer_vs_hf: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), output $OUT"
  if [[ ${GPU_CHECK_CPU:-0} == 1 ]]; then
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    timeout -k 15 500 "$PY" bench/trainer_vs_hf.py --gpu --tiny --runs 1 --steps 4 \
      --out "$OUT/trainer_vs_hf_gpu_tiny.json"
    return
  fi
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "no .whl/*.whl here: run bash bench/gpu_wheels.sh on a machine with PyPI and copy .whl/ here"
    return 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
  export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  # 3 runs per arm, alternated; each run: load + quantize, STEPS optimizer steps of one 2048-token row
  timeout -k 15 520 "$PY" bench/trainer_vs_hf.py --gpu --runs "$RUNS" --steps "$STEPS" \
    --out "$OUT/trainer_vs_hf_gpu.json"
}

main 2>&1 | tee "$OUT/trainer_vs_hf_gpu.log"
exit "${PIPESTATUS[0]}"
