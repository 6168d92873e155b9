#!/usr/bin/env bash
# Fetch the wheels a GPU machine without internet lacks, into .whl/ at the repository root; run
# this on a machine with PyPI, copy the checkout with .whl/ to the GPU machine, and there
# bench/gpu_check.sh (or bench/gpu_trainer_vs_hf.sh) installs them with pip --no-index:
#
#   bash bench/gpu_wheels.sh                    # here: .whl/
#   OUT=gpu_out bash bench/gpu_check.sh         # on the GPU machine
#
# Target: CPython 3.12, manylinux x86_64, a GPU machine whose Python already has torch (a CUDA 13.0
# build), transformers, peft, accelerate, safetensors, sentencepiece, pyyaml, numpy, msgpack, ninja,
# py-cpuinfo, psutil, einops, tqdm, packaging and pytest. Fetched for it:
#   bitsandbytes  (NF4 layers)                       binary wheel, trimmed to the CPU and CUDA 13.0
#                                                    libraries (see below)
#   deepspeed     (ZeRO-2 engine)                    built here from its sdist: pure Python
#   hjson, pydantic, pydantic-core, annotated-types,
#   typing-inspection                                deepspeed's runtime needs
#   typing-extensions                                pydantic 2.14 needs >= 4.16 (an image's may be older)
# Not fetched: snakemake (dozens of deps). The GPU check drives `snaketune train` by hand;
# snaketune.cli imports snakemake.utils.validate only to check the config against
# config/schema.yaml, and tests/test_gpu.py supplies a no-op stand-in where snakemake is missing.
#
# The versions are the ones pinned in requirements.txt (one version of each: two of the same
# package stop the install there). .whl/ must stay small enough to copy with the checkout: this
# fails above LIMIT_MIB (default 55).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
LIMIT_MIB=${LIMIT_MIB:-55}
DEST=.whl

# Keep .whl/ out of git (and out of the tracked tree); it is copied beside the checkout.
mkdir -p .git/info
touch .git/info/exclude
grep -qxF '/.whl/' .git/info/exclude || echo '/.whl/' >>.git/info/exclude

mkdir -p "$DEST"
rm -f "$DEST"/*.whl

PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
          --platform any)
BINARY=(bitsandbytes==0.50.2 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5 typing-extensions==4.16.0)

echo "== downloading ${BINARY[*]}"
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$DEST" "${BINARY[@]}"

echo "== building deepspeed==0.19.8 from its sdist (pure Python; no ops are prebuilt)"
# --no-build-isolation: its setup.py imports torch; an isolated build would download a torch wheel.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed -w "$DEST" deepspeed==0.19.8

# Checks: exactly one wheel per package, the deepspeed wheel is pure Python, and bitsandbytes
# ships the native library for the GPU machine's CUDA 13.0 build of torch. Then the
# bitsandbytes wheel is trimmed to the native libraries the GPU machine can load (CPU and
# CUDA $BNB_CUDA, default 130: torch 2.11+cu130 makes bitsandbytes load
# libbitsandbytes_cuda130.so): the published wheel also carries libraries for other CUDA, ROCm
# and XPU versions, which the GPU machine never loads. Same file name and version; only those .so files and
# their RECORD rows are dropped, the kept files are byte-identical.
BNB_CUDA=${BNB_CUDA:-130} "$PY" - "$DEST" <<'EOF'
import os, re, sys, zipfile
from collections import Counter
from pathlib import Path

dest = Path(sys.argv[1])
keep_cuda = set(os.environ["BNB_CUDA"].split(","))
wheels = sorted(dest.glob("*.whl"))
names = Counter(re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() for w in wheels)
dup = [n for n, c in names.items() if c > 1]
if dup:
    sys.exit(f"more than one wheel of {dup}: the install there would fail")
need = {"bitsandbytes", "deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types",
        "typing-inspection", "typing-extensions"}
if need - set(names):
    sys.exit(f"missing wheels: {sorted(need - set(names))}")
ds = next(w for w in wheels if w.name.startswith("deepspeed-"))
if not ds.name.endswith("-py3-none-any.whl"):
    sys.exit(f"{ds.name}: expected a pure-Python wheel")
bnb = next(w for w in wheels if w.name.startswith("bitsandbytes-"))
libs = [n for n in zipfile.ZipFile(bnb).namelist() if re.search(r"libbitsandbytes_cuda\d+\.so$", n)]
print("bitsandbytes CUDA libraries:", " ".join(sorted(Path(n).name for n in libs)))
if not any(n.endswith("libbitsandbytes_cuda130.so") for n in libs):
    sys.exit("bitsandbytes wheel has no libbitsandbytes_cuda130.so (torch there is built for CUDA 13.0)")

def dropped(name: str) -> bool:
    m = re.search(r"libbitsandbytes_([a-z]+)(\d*)\.so$", name)
    return bool(m) and m.group(1) != "cpu" and not (m.group(1) == "cuda" and m.group(2) in keep_cuda)

tmp = bnb.with_suffix(".tmp")
with zipfile.ZipFile(bnb) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
    gone = [i.filename for i in src.infolist() if dropped(i.filename)]
    for info in src.infolist():
        if dropped(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            rows = data.decode().splitlines(keepends=True)
            data = "".join(r for r in rows if r.split(",", 1)[0] not in gone).encode()
        out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
tmp.replace(bnb)
kept = sorted(Path(n).name for n in zipfile.ZipFile(bnb).namelist() if n.endswith(".so"))
print(f"bitsandbytes wheel trimmed: {len(gone)} native libraries dropped; kept {' '.join(kept)}")
EOF

echo "== wheels in $DEST"
for f in "$DEST"/*.whl; do
  awk -v b="$(stat -c %s "$f")" -v f="$f" 'BEGIN {printf "%10.2f MiB  %s\n", b / 1048576, f}'
done
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
mib=$(( (total + 1048575) / 1048576 ))
echo "total: $(awk -v b="$total" 'BEGIN {printf "%.1f", b / 1048576}') MiB (limit ${LIMIT_MIB} MiB)"
if (( mib > LIMIT_MIB )); then
  echo "error: $DEST is over ${LIMIT_MIB} MiB" >&2
  exit 1
fi
if git check-ignore -q "$DEST/x.whl"; then
  echo "$DEST/ is ignored by git (.git/info/exclude): copy it to the GPU machine with the checkout"
else
  echo "error: $DEST/ is not ignored by git" >&2
  exit 1
fi
