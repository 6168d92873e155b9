#!/usr/bin/env bash
# The GPU check: does snaketune's recipe run on this CUDA GPU, and how fast? One command, no
# internet needed (sized to finish in about 8 minutes on one H100).
#
# On a machine with PyPI, fetch the wheels the GPU machine lacks; copy the checkout with .whl/ to
# the GPU machine; run this there:
#     bash bench/gpu_wheels.sh                    # on the machine with PyPI: .whl/
#     OUT=gpu_out bash bench/gpu_check.sh         # on the GPU machine
# It expects Python 3.12 with a CUDA 13.0 build of torch, transformers, peft, accelerate and pytest.
# Results in $OUT (default /tmp/gpu_check_out): gpu_check.log (everything printed), gpu_tests.xml
# (pytest's JUnit report) and gpu_bench.json (bench/gpu_bench.py's figures).
#
# Steps (each is time-limited; every step runs, and the exit status is non-zero if any failed):
#   1. install the wheels of .whl/ into /tmp/site (pip --no-index; no `pip install -e .`: the
#      checkout is put on PYTHONPATH, so `import snaketune` and `python -m snaketune.cli` work);
#   2. nvidia-smi, versions, and a preflight: CUDA visible, a bitsandbytes NF4 layer runs on the GPU,
#      DeepSpeed picks its CUDA accelerator;
#   3. pytest -m gpu tests/test_gpu.py -x   (NF4 + bf16 on CUDA, training by hand, SIGKILL + resume
#      bit-identical with LoRA dropout, device "cuda" in the summary, merge --device cuda against PEFT);
#   4. python bench/gpu_bench.py            (QLoRA tokens/s, peak memory, MFU at InternLM2-1.8B shapes,
#      with the bf16 autocast of the forward pass; the JSON names the versions it ran with);
#   5. on a machine with two or more GPUs only: the same benchmark on two ranks (torchrun, NCCL,
#      ZeRO-2), gpu_bench_2ranks.json. (Step 3 then also runs the two-GPU tests of tests/test_gpu.py:
#      ranks that see different free memory agree and finish; a by-hand training on two ranks.)
#
# The figures are those of the machine's own torch, transformers and peft (preinstalled there, not
# the project's pins) and of the wheels in .whl/: the preflight prints every version, and
# gpu_bench.json records them beside its figures.
#
# Dry run on a machine without a GPU (tests skip, the benchmark runs --tiny, nothing is installed):
#     GPU_CHECK_CPU=1 PYTHON=.venv/bin/python OUT=/tmp/gpu_check bash bench/gpu_check.sh
# shellcheck disable=SC2317  # the step functions are called through `step NAME FUNCTION`
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
PY=${PYTHON:-python3}
CPU_DRY_RUN=${GPU_CHECK_CPU:-0}
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-270}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-170}
TWO_RANK_TIMEOUT=${TWO_RANK_TIMEOUT:-170}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

declare -A STATUS=()
ORDER=()
step() {  # step NAME COMMAND...: run, record pass/fail, never stop the script
  local name=$1 t0=$SECONDS rc
  shift
  echo
  echo "=================== $name ($(date -u +%H:%M:%S))"
  "$@"
  rc=$?
  ORDER+=("$name")
  STATUS[$name]="$([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t0)) s"
  echo "=================== $name: ${STATUS[$name]}"
  return $rc
}

install_wheels() {
  if [[ $CPU_DRY_RUN == 1 ]]; then
    echo "GPU_CHECK_CPU=1: using $PY's own packages"
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    return 0
  fi
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "no .whl/*.whl here: run bash bench/gpu_wheels.sh on a machine with PyPI and copy .whl/ here"
    return 1
  fi
  ls -l .whl/
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
  export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
}

preflight() {
  nvidia-smi || echo "(no nvidia-smi)"
  echo "git: $(command -v git || echo 'missing (tests/test_gpu.py supplies a stand-in for provenance)')"
  echo "PYTHONPATH=$PYTHONPATH"
  "$PY" - "$CPU_DRY_RUN" <<'EOF'
import sys
from importlib import metadata

dry = sys.argv[1] == "1"
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "pydantic", "hjson",
             "safetensors", "tokenizers", "huggingface-hub", "sentencepiece", "pyyaml", "numpy", "pytest",
             "typing-extensions", "snakemake"):
    try:
        print(f"  {name:18} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name:18} -")
import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    if dry:
        print("no CUDA (GPU_CHECK_CPU=1): the gpu tests will skip")
        sys.exit(0)
    sys.exit("CUDA is not available: the gpu tests would only skip")
print(f"GPU: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}, "
      f"bf16 {torch.cuda.is_bf16_supported()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
import bitsandbytes as bnb

layer = bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
y = layer(torch.randn(4, 256, device="cuda", dtype=torch.bfloat16))
assert y.dtype is torch.bfloat16 and torch.isfinite(y).all()
print(f"bitsandbytes {bnb.__version__}: NF4 Linear4bit forward on cuda ok ({bnb.__file__})")
from deepspeed.accelerator import get_accelerator

assert get_accelerator()._name == "cuda", get_accelerator()._name
import snaketune.cli  # noqa: F401  (the checkout is importable)

print("deepspeed accelerator: cuda; snaketune importable from", snaketune.cli.__file__)
EOF
}

run_tests() {
  timeout -k 15 "$PYTEST_TIMEOUT" "$PY" -m pytest -m gpu tests/test_gpu.py -x -v -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml"
}

run_bench() {
  local args=(--out "$OUT/gpu_bench.json")
  [[ $CPU_DRY_RUN == 1 ]] && args=(--tiny --out "$OUT/gpu_bench_tiny.json")
  timeout -k 15 "$BENCH_TIMEOUT" "$PY" bench/gpu_bench.py "${args[@]}"
}

gpu_count() {
  "$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0
}

run_bench_two_ranks() {
  timeout -k 15 "$TWO_RANK_TIMEOUT" "$PY" -m torch.distributed.run --nproc_per_node 2 --master_port 29533 \
    bench/gpu_bench.py --out "$OUT/gpu_bench_2ranks.json"
}

main() {
  local failed=0
  echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), checkout $ROOT, output $OUT"
  # Each step exports into this shell: PYTHONPATH from install_wheels must reach the later steps.
  step "install wheels" install_wheels || failed=1
  if [[ $failed == 0 ]]; then
    step "preflight" preflight || failed=1
  fi
  if [[ $failed == 0 ]]; then
    step "pytest -m gpu" run_tests || failed=1
    step "benchmark" run_bench || failed=1
    if [[ $CPU_DRY_RUN != 1 && $(gpu_count) -ge 2 ]]; then
      step "benchmark, 2 ranks" run_bench_two_ranks || failed=1
    else
      echo "(one GPU or none: no two-rank run)"
    fi
  fi
  echo
  echo "=================== summary"
  for name in "${ORDER[@]}"; do printf '  %-16s %s\n' "$name" "${STATUS[$name]}"; done
  local bench_json=$OUT/gpu_bench.json
  [[ $CPU_DRY_RUN == 1 ]] && bench_json=$OUT/gpu_bench_tiny.json
  if [[ -f $bench_json ]]; then
    "$PY" - "$bench_json" <<'EOF'
import json, sys

d = json.load(open(sys.argv[1]))
f = d["figures"]
fmt = lambda v, spec: "-" if v is None else format(v, spec)
print(f"  bench: {d['card']}: {fmt(f['tokens_per_s'], '.0f')} tokens/s, MFU {fmt(f['mfu'], '.1%')}, "
      f"peak {fmt(f['peak_memory_train_gib'], '.2f')} GiB, {fmt(f['seconds_per_optimizer_step'], '.2f')} s/step "
      f"({d['settings']['tokens_per_optimizer_step']} tokens), autocast {d['settings'].get('autocast')}")
v = d["versions"]
print("  with " + ", ".join(f"{k} {v.get(k)}" for k in ("torch", "transformers", "peft", "bitsandbytes", "deepspeed")))
EOF
  fi
  echo "  total: $SECONDS s; result: $([[ $failed == 0 ]] && echo PASS || echo FAIL)"
  return $failed
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
