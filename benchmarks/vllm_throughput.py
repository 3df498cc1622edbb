"""vLLM sampling and the vLLM judge on a GPU, for benchmarks/gpu_all.sh. NOT RUN YET: no GPU with vLLM was
available when it was written, and on a CPU vLLM is for correctness tests, not speed (docs/vllm.md).

It reuses gpu_all.sh's work folder (the 8B-shaped random model and r=32 adapter that sample_throughput.py
builds there), so its figures sit beside plain ``generate`` from the same run:

* ``sample``: ``sample_prompts_vllm`` on the same em prompt rows and token budget as sample_throughput.py,
  adapter unmerged, one seeded request per answer. New tokens/s, wall clock, engine start excluded (and
  recorded).
* ``judge``: ``VLLMJudge`` (exact 0..100 scoring with prefix caching) on ``--answers`` judge prompts.

Writes ``vllm_throughput_gpu.json`` (device, params_b, sample.new_tokens_per_s, judge.requests_per_s) into
``--out-dir``; report/estimate.py reads that file from benchmarks/results/ once it is committed there.

    python benchmarks/vllm_throughput.py --workdir DIR [--questions 8 --samples 32 --max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="gpu_all.sh's work folder (llama8b_shape/, adapter_r32/)")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--answers", type=int, default=8, help="judge prompts")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args()

    import torch

    from character_em.evals import suites
    from character_em.judge.core import PROMPT_TEMPLATES, build_judge_prompt
    from character_em.judge.verdicts import JudgeRequest
    from character_em.judge.vllm_backend import VLLMJudge
    from character_em.sampling import vllm_backend as V

    work = Path(args.workdir)
    model, adapter = work / "llama8b_shape", work / "adapter_r32"  # built by sample_throughput.py
    from safetensors import safe_open

    n_params = 0
    for f in sorted(model.glob("*.safetensors")):  # headers only: no weights are read
        with safe_open(str(f), framework="pt") as st:
            n_params += sum(_numel(st.get_slice(k).get_shape()) for k in st.keys())
    rows = suites.build_prompts(
        "em", {"n_samples": args.samples, "max_questions": args.questions, "formats": ["plain"]}
    )
    out: dict = {"device": torch.cuda.get_device_name(0), "workdir": str(work)}

    t0 = time.perf_counter()
    engine = V.start_engine(str(model), lora=True, max_lora_rank=32, max_model_len=2048, dtype="bf16")
    out["engine_start_s"] = time.perf_counter() - t0
    identity = {"model": "bench", "condition": "bench", "seed": 0}
    t0 = time.perf_counter()
    df = V.sample_prompts_vllm(
        str(model), adapter, rows, identity=identity, temperature=1.0, top_p=1.0,
        max_new_tokens=args.max_new_tokens, base_seed=0, max_lora_rank=32, engine=engine, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    out["sample"] = {"answers": df.height, "new_tokens": int(df["answer_tokens"].sum()), "seconds": seconds,
                     "new_tokens_per_s": int(df["answer_tokens"].sum()) / seconds}  # fmt: skip
    out["params_b"] = n_params / 1e9
    engine.llm_engine.engine_core.shutdown()
    del engine
    torch.cuda.empty_cache()

    judge = VLLMJudge(model=str(model), dtype="bf16", max_model_len=4096)
    answers = df["answer"].to_list()[: args.answers]
    questions = df["question"].to_list()[: args.answers]
    requests = [
        JudgeRequest("alignment", build_judge_prompt(PROMPT_TEMPLATES["alignment"], q, a), q, a)
        for q, a in zip(questions, answers, strict=True)
    ]
    judge.score_batch(requests[:1])  # engine start and warm-up, untimed
    t0 = time.perf_counter()
    judge.score_batch(requests)
    seconds = time.perf_counter() - t0
    out["judge"] = {"requests": len(requests), "seconds": seconds, "requests_per_s": len(requests) / seconds,
                    "stats": judge.stats}  # fmt: skip
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "vllm_throughput_gpu.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":  # vLLM's workers start with spawn
    main()
