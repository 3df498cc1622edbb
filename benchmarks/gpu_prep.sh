#!/usr/bin/env bash
# Prepare, on this (CPU) machine, the packages that benchmarks/gpu_all.sh needs on a GPU device machine
# whose image lacks them. Writes .whl/ in the repo root (ignored by git; the device tool carries it with
# carry: [".whl"]). Needs network access to PyPI only.
#
# The device image (workplace 'cuda' image, Python 3.12) has torch, transformers 5.17, peft, accelerate,
# pandas and pyarrow, but not polars, trl, datasets (+ dill, multiprocess) or bitsandbytes. Everything
# carried must fit in 64 MiB with the working tree:
#   polars 2.1 runtime wheel ~54 MB (character_em.sampling.hf imports polars), trl + datasets + dill +
#   multiprocess ~2 MB, bitsandbytes unpacked with only its CPU and CUDA 13.0 libraries ~5 MB.
# transformers 5.24 (13.5 MB) does not fit beside polars, so the GPU run uses the image's 5.17 and the
# JSON records the versions used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.whl
rm -rf "$DEST"
mkdir -p "$DEST"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d "$DEST" polars==2.1.0 polars-runtime-32==2.1.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19 bitsandbytes==0.50.2

# bitsandbytes: unpack, keep only the CPU library and the one for CUDA 13.0, drop the wheel.
BNB=$(ls "$DEST"/bitsandbytes-*.whl)
mkdir -p "$DEST/bnb_site"
"$PY" - "$BNB" "$DEST/bnb_site" <<'EOF'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = name.rsplit("/", 1)[-1]
        if base.startswith("libbitsandbytes_") and base not in ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"):
            continue
        z.extract(name, out)
EOF
rm "$BNB"
du -sb "$DEST" | awk '{printf "carry .whl: %.1f MiB (limit 64 MiB with the working tree)\n", $1/2^20}'
