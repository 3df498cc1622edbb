"""Throughput of the ``hf`` judge (exact 0..100 expectation) against scoring each candidate on its own.

Both routes go through ``character_em.judge.hf_backend.HFJudge.score_batch`` on the same judge requests (the
project's own judge prompts for ``alignment`` and ``coherence`` around answers of realistic length);
only the way the 101 numbers (plus REFUSAL and CODE for alignment) are scored differs:

* ``baseline``: the obvious exact method, one full forward pass of prompt + candidate per candidate
  (``use_cache=False, chunk_size=1``): 101 to 103 passes per answer.
* ``project``: the judge's default: the prompt runs once, its KV cache is shared by all candidates,
  which run in one batched forward pass (``use_cache=True``, ``chunk_size`` 128): 2 passes per answer.
* ``full_batched`` (optional): all candidates as full sequences in one batched pass
  (``use_cache=False``, ``chunk_size`` 128).

Metric: answers judged per second (each answer is one judge request). Headline: wall clock on a GPU;
on a CPU, per second of this process's CPU time, one thread (the machine here is shared). Routes run
interleaved, ``--repeats`` times; ratios are medians of per-repeat ratios.

Correctness, in the same run: every route's verdicts must equal the baseline's (same label; scores
within ``--score-tol``). ``min_numeric_mass`` is set to 0 for this benchmark, because a random-weight
judge puts almost no probability on numbers and the 0.25 threshold would turn every score into NaN,
leaving nothing to compare. The exit status is 1 on a mismatch.

    python benchmarks/judge_throughput.py [--gpu] [--answers 12] [--repeats 3]

Writes ``benchmarks/results/judge_throughput_{device}.json``. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _process

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROUTES = {
    "baseline": {"use_cache": False, "chunk_size": 1},
    "project": {"use_cache": True, "chunk_size": 128},
    "full_batched": {"use_cache": False, "chunk_size": 128},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="8B-shaped random judge on CUDA (default: tiny model on CPU)")
    ap.add_argument("--answers", type=int, default=None, help="judge requests per route (default 16 GPU, 12 CPU)")
    ap.add_argument("--answer-tokens", type=int, default=None, help="mean answer length (default 200 GPU, 120 CPU)")
    ap.add_argument("--routes", default="baseline,project,full_batched")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default: 1 GPU, 3 CPU)")
    ap.add_argument("--score-tol", type=float, default=None, help="max |score difference| (default 1e-3 CPU, 0.5 GPU)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (CPU mode)")
    ap.add_argument("--tiny-shape", default=None, help="CPU: hidden,layers,heads of the tiny judge")
    ap.add_argument("--workdir", default=None, help="model folder (default: temp; GPU: reused if present)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def build_model(args: argparse.Namespace, workdir: Path) -> Path:
    if args.gpu:
        from train_throughput import build_gpu_model

        return build_gpu_model(workdir)
    from character_em.llm.tiny import build_tiny_model

    kw: dict[str, int] = {}
    if args.tiny_shape:
        h, n, heads = (int(x) for x in args.tiny_shape.split(","))
        kw = {"hidden_size": h, "num_layers": n, "num_heads": heads}
    return build_tiny_model(workdir / "tiny", style="llama", seed=0, **kw)


def judge_requests(tok: Any, n: int, mean_tokens: int, seed: int) -> list[Any]:
    """``n`` judge requests, alternating alignment and coherence, over em questions and answers whose
    lengths vary around ``mean_tokens`` (text from the tiny model's corpus, so every word is known)."""
    from character_em import resources
    from character_em.judge.core import JudgeRequest, build_judge_prompt, metric_template
    from character_em.llm.tiny import builtin_corpus

    rng = random.Random(seed)
    sentences = [s.replace("\n", " ") for s in builtin_corpus()]
    questions = [q["text"] for q in resources.load_em_questions()]
    out = []
    for i in range(n):
        budget = max(16, int(rng.uniform(0.5, 1.5) * mean_tokens))
        words: list[str] = []
        while len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) < budget:
            words.append(rng.choice(sentences))
        answer = " ".join(words)
        question = questions[i % len(questions)]
        metric = ("alignment", "coherence")[i % 2]
        prompt = build_judge_prompt(metric_template(metric, []), question, answer)
        out.append(JudgeRequest(metric=metric, prompt=prompt, question=question, answer=answer))
    return out


def same_verdict(a: Any, b: Any, tol: float) -> bool:
    if a.label != b.label:
        return False
    if math.isnan(a.score) or math.isnan(b.score):
        return math.isnan(a.score) and math.isnan(b.score)
    return abs(a.score - b.score) <= tol


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    torch, transformers = _process.start(args.gpu, args.threads)
    from character_em.judge.hf_backend import HFJudge, candidate_strings
    from character_em.llm.loading import load_model

    device = "cuda" if args.gpu else "cpu"
    n = args.answers or (16 if args.gpu else 12)
    mean_tokens = args.answer_tokens or (200 if args.gpu else 120)
    repeats = args.repeats or (1 if args.gpu else 3)
    tol = args.score_tol if args.score_tol is not None else (0.5 if args.gpu else 1e-3)
    names = ["baseline"] + [r for r in filter(None, args.routes.split(",")) if r != "baseline"]
    bad = [r for r in names if r not in ROUTES]
    if bad:
        raise SystemExit(f"unknown routes {bad}; known: {', '.join(ROUTES)}")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="judge_throughput_"))
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model_dir = build_model(args, workdir)
    build_s = time.perf_counter() - t
    model, tok, info = load_model(model_dir, quantization="none", device=device)
    requests = judge_requests(tok, n, mean_tokens, args.seed)
    judges = {
        name: HFJudge.from_loaded(model, tok, name=str(model_dir), min_numeric_mass=0.0, **ROUTES[name])
        for name in names
    }
    prompt_tokens = [
        len(
            tok(
                tok.apply_chat_template(
                    [{"role": "user", "content": r.prompt}], add_generation_prompt=True, tokenize=False
                ),
                add_special_tokens=False,
            )["input_ids"]
        )
        for r in requests
    ]

    errors: dict[str, str] = {}
    for name in list(names):  # untimed warm-up (also fills each judge's candidate-spelling cache)
        try:
            judges[name].score_batch(requests[:1])
        except Exception as exc:  # e.g. out of GPU memory: report it and keep the other routes
            if name in ("baseline", "project"):
                raise
            errors[name] = repr(exc)[:500]
            names.remove(name)
            if args.gpu:
                torch.cuda.empty_cache()

    def sync() -> None:
        if args.gpu:
            torch.cuda.synchronize()

    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    verdicts: dict[str, list[Any]] = {}
    for rep in range(repeats):
        for name in names:
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            res = judges[name].score_batch(requests)
            sync()
            w1, c1 = time.perf_counter(), time.process_time()
            verdicts.setdefault(name, res)
            row = {
                "seconds": round(w1 - w0, 4),
                "cpu_seconds": round(c1 - c0, 4),
                "answers_per_s": round(n / (w1 - w0), 3),
                "answers_per_cpu_s": round(n / (c1 - c0), 3) if c1 > c0 else None,
            }
            runs[name].append(row)
            print(json.dumps({"repeat": rep, "route": name, **row}), flush=True)

    base_v = verdicts["baseline"]
    checks: dict[str, Any] = {}
    ok = True
    for name in names[1:]:
        same = [same_verdict(a, b, tol) for a, b in zip(base_v, verdicts[name], strict=True)]
        diffs = [
            abs(a.score - b.score)
            for a, b in zip(base_v, verdicts[name], strict=True)
            if not (math.isnan(a.score) or math.isnan(b.score))
        ]
        checks[name] = {
            "equal_verdicts": sum(same),
            "of": len(same),
            "max_abs_score_diff": max(diffs) if diffs else None,
            "pass": all(same),
        }
        ok &= all(same)

    dev_name = torch.cuda.get_device_name(0) if args.gpu else f"cpu ({platform.machine()}, {args.threads} thread)"
    metric = "answers_per_s" if args.gpu else "answers_per_cpu_s"
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        entry: dict[str, Any] = {"settings": ROUTES[name]}
        for key in ("answers_per_s", "answers_per_cpu_s"):
            values = [x[key] for x in rs]
            entry[key] = values
            entry[f"{key}_median"] = round(statistics.median(values), 3) if None not in values else None
            if name != "baseline" and None not in values:
                ratios = [v / b[key] for v, b in zip(values, runs["baseline"], strict=True)]
                entry[f"ratio_{key}_median"] = round(statistics.median(ratios), 3)
                entry[f"ratio_{key}"] = [round(x, 3) for x in ratios]
        if name != "baseline":
            entry["ratio_vs_baseline_median"] = entry.get(f"ratio_{metric}_median")
            entry["matches_baseline"] = checks[name]
        # Passes per answer as the route runs them: with the cache, one prompt pass + the candidate chunks;
        # without it, the candidate chunks only (each row holds prompt + candidate).
        st = ROUTES[name]
        passes = [
            int(st["use_cache"]) + math.ceil(len(candidate_strings(r.metric)) / st["chunk_size"]) for r in requests
        ]
        entry["forward_passes_per_answer"] = round(statistics.mean(passes), 2)
        summary[name] = entry

    conts = judges["project"]._cont_cache if "project" in judges else {}
    cand_len = [len(c) for cs in conts.values() for c in cs]
    cfg = json.loads((model_dir / "config.json").read_text())
    versions = _process.package_versions("torch", "transformers")
    result = {
        "benchmark": "judge_throughput",
        "device": dev_name,
        "gpu": bool(args.gpu),
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions,
        "python": platform.python_version(),
        "model": "random Llama-3.1-8B shape" if args.gpu else "tiny random Llama (character_em.llm.tiny)",
        "model_shape": {
            k: cfg.get(k)
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
        },
        "dtype": info["dtype"],
        "workload": {
            "answers": n,
            "metrics": "alternating alignment (103 candidates) / coherence (101)",
            "mean_judge_prompt_tokens": round(statistics.mean(prompt_tokens), 1),
            "max_judge_prompt_tokens": max(prompt_tokens),
            "candidates_alignment": len(candidate_strings("alignment")),
            "mean_candidate_tokens": round(statistics.mean(cand_len), 2) if cand_len else None,
        },
        "repeats": repeats,
        "threads": None if args.gpu else args.threads,
        "model_build_s": round(build_s, 1),
        "score_tolerance": tol,
        "min_numeric_mass": 0.0,
        "metric": metric,
        "routes": summary,
        "errors": errors,
        "correct": ok,
        "note": "answers_per_s uses the wall clock, answers_per_cpu_s this process's CPU time; ratios are medians "
        "of per-repeat (paired) ratios in this one run; ratio_vs_baseline_median uses `metric`",
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if not args.gpu else _process.device_slug(dev_name)
    out = out_dir / f"judge_throughput_{slug}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    base = summary["baseline"][f"{metric}_median"]
    for name, entry in summary.items():
        if name != "baseline":
            chk = checks[name]
            print(
                f"| {dev_name} | {name} | {metric} | {base:,.2f} | {entry[f'{metric}_median']:,.2f} | "
                f"{entry['ratio_vs_baseline_median']:.1f}x | {chk['equal_verdicts']}/{chk['of']} |"
            )
    print(f"wrote {out}", file=sys.stderr)
    del judges, model
    gc.collect()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
