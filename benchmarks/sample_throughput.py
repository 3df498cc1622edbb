"""Sampling throughput of the project's path against plain ``generate``, measured in one run.

All routes answer the same prompt rows (the ``em`` suite's questions x formats, each asked
``--samples`` times, as the paper grid does with 50 x 48) at the same batch size, in the same batch
order, with the same temperature, top_p and token budget:

* ``baseline``: plain ``model.generate`` on the base model with the LoRA adapter left unmerged
  (a ``PeftModel``), left padding: what the anchor in docs/anchors.md measures (2,734 new tokens/s at
  batch 256 on an H200).
* ``project``: ``character_em.sampling.hf.sample_prompts`` on the model loaded with the adapter merged:
  exactly what ``workflow_scripts/sample.py`` does (``modeling.load_model(..., merge=True)``).
* ``project_unmerged``: the same loop on the unmerged adapter (separates the loop from the merge).
* ``hf_generate_merged``: plain ``generate`` on the merged model (separates the merge from the loop).
* ``hf_generate_merged_static_compiled`` (GPU only): ``generate`` with a static KV cache, which
  transformers compiles. Recorded as skipped on a CPU.

New tokens are answer tokens up to (not counting) the first end-of-turn token, summed over all
answers. Routes run interleaved, ``--repeats`` times, after one untimed warm-up batch each; the
ratio is the median of the per-repeat ratios. Headline: wall-clock new tokens/s on a GPU; on a CPU,
new tokens per second of this process's CPU time (one thread; the machine here is shared).

Correctness, in the same run: greedy decoding (``temperature: 0``, which ``sample.py`` decodes by
argmax and which consumes no randomness) through ``sample_prompts`` on the merged model against plain
greedy ``generate`` on the merged model, at equal batching (each prompt alone; all in one padded
batch). Answers and token counts must be equal; a mismatch exits with status 1. Recorded besides: our
batched answers against ``generate`` alone, and against the unmerged adapter. In bf16 on a GPU other
batch shapes and merged weights round differently, so those counts can fall short without a bug.

    python benchmarks/sample_throughput.py [--gpu] [--questions 48] [--samples 50] [--repeats 3]

Writes ``benchmarks/results/sample_throughput_{device}.json`` and prints Markdown table rows.
Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _process

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark scripts

ROUTES = ("baseline", "project", "project_unmerged", "hf_generate_merged", "hf_generate_merged_static_compiled")
GPU_ONLY = ("hf_generate_merged_static_compiled",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="8B-shaped random model on CUDA (default: tiny model on CPU)")
    ap.add_argument(
        "--questions", type=int, default=None, help="prompt rows (em questions x formats; default 48 GPU, 16 CPU)"
    )
    ap.add_argument("--samples", type=int, default=None, help="answers per prompt row (default 50 GPU, 8 CPU)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 256 GPU, 48 CPU")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 GPU, 32 CPU")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--routes", default=",".join(ROUTES), help="comma list; baseline always runs")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default: 1 GPU, 3 CPU)")
    ap.add_argument("--greedy-prompts", type=int, default=8, help="prompts in the greedy correctness check")
    ap.add_argument("--greedy-tokens", type=int, default=None, help="greedy tokens per prompt (default 64 GPU, 24 CPU)")
    ap.add_argument("--lora-r", type=int, default=32, help="adapter rank (config.yaml's train default: 32)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (CPU mode)")
    ap.add_argument(
        "--tiny-shape",
        default=None,
        help="CPU: hidden,layers,heads of the tiny model (default: character_em.llm.tiny's)",
    )
    ap.add_argument("--workdir", default=None, help="model + adapter folder (default: temp; GPU: reused if present)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--profile", default=None, help="CPU: write a cProfile of one project repeat to this file")
    ap.add_argument(
        "--tag", default="", help="suffix of the result file name (sample_throughput_{device}{tag}.json, e.g. _static)"
    )
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- setup


def build_model(args: argparse.Namespace, workdir: Path) -> Path:
    if args.gpu:
        from train_throughput import build_gpu_model

        return build_gpu_model(workdir)  # the same 8B-shaped model as train_throughput (reused if present)
    from character_em.llm.tiny import build_tiny_model

    kw: dict[str, int] = {}
    if args.tiny_shape:
        h, n, heads = (int(x) for x in args.tiny_shape.split(","))
        kw = {"hidden_size": h, "num_layers": n, "num_heads": heads}
    return build_tiny_model(workdir / "tiny", style="llama", seed=0, **kw)


def build_adapter(model_dir: Path, out: Path, r: int, seed: int, device: str) -> Path:
    """A LoRA adapter on every projection (as the project trains them) with small random B, so that the
    adapter changes the outputs and merging changes the weights (peft's default B = 0 is a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from character_em.llm.loading import load_model

    if (out / "adapter_config.json").is_file():
        return out
    model, _tok, _info = load_model(model_dir, quantization="none", device=device)
    lc = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        use_rslora=True,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, lc)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    peft_model.save_pretrained(out)
    del peft_model, model
    gc.collect()
    return out


def prompt_rows(n_questions: int, n_samples: int) -> list[dict[str, Any]]:
    """The em suite's rows (questions x formats), the first ``n_questions``, each asked ``n_samples`` times."""
    from character_em.evals import suites

    per_fmt = max(1, -(-n_questions // 3))
    rows = suites.build_prompts("em", {"n_samples": n_samples, "max_questions": per_fmt})
    if len(rows) < n_questions:
        rows = suites.build_prompts("em", {"n_samples": n_samples})
    return rows[:n_questions]


def expanded_prompts(tok: Any, rows: list[dict[str, Any]]) -> tuple[list[list[int]], list[int]]:
    """Rendered prompt ids per answer and the order ``sample_prompts`` decodes them in (by length).
    Every route uses these batches, so only the decoding engine differs."""
    from character_em.llm.chat import render_prompt

    ids: list[list[int]] = []
    for r in rows:
        p = render_prompt(tok, r["messages"])
        ids.extend([p] * int(r["n_samples"]))
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    return ids, order


# --------------------------------------------------------------------------- routes


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def count_new(row: list[int], stops: set[int], pad_id: int) -> int:
    n = 0
    for t in row:
        if t in stops:
            break
        n += 1
    return n


def hf_generate_batches(
    model: Any,
    prompts: list[list[int]],
    order: list[int],
    *,
    batch_size: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stops: set[int],
    pad_id: int,
    extra: dict[str, Any] | None = None,
    limit_batches: int | None = None,
) -> tuple[int, list[list[int]]]:
    """Plain ``generate`` over left-padded batches; returns (new tokens, per-answer new ids in ``order``)."""
    import torch

    device = next(model.parameters()).device
    total, outs = 0, []
    starts = list(range(0, len(order), batch_size))[:limit_batches]
    for s in starts:
        chunk = [prompts[i] for i in order[s : s + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        kw: dict[str, Any] = {
            "do_sample": temperature > 0,
            "max_new_tokens": max_new_tokens,
            "eos_token_id": sorted(stops),
            "pad_token_id": pad_id,
        }
        if temperature > 0:
            kw.update(temperature=temperature, top_p=top_p, top_k=0)
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw, **(extra or {}))
        for row in out[:, width:].tolist():
            n = count_new(row, stops, pad_id)
            total += n
            outs.append(row[:n])
    return total, outs


def project_batches(
    model: Any,
    tok: Any,
    rows: list[dict[str, Any]],
    *,
    batch_size: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
) -> tuple[int, Any]:
    from character_em.sampling.hf import sample_prompts

    df = sample_prompts(
        model,
        tok,
        rows,
        identity={"model": "bench", "condition": "bench", "seed": seed},
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        base_seed=seed,
        progress=False,
    )
    return int(df["answer_tokens"].sum()), df


def timed(fn: Callable[[], int]) -> dict[str, float]:
    sync()
    w0, c0 = time.perf_counter(), time.process_time()
    tokens = fn()
    sync()
    w1, c1 = time.perf_counter(), time.process_time()
    return {
        "new_tokens": tokens,
        "seconds": round(w1 - w0, 4),
        "cpu_seconds": round(c1 - c0, 4),
        "new_tokens_per_s": round(tokens / (w1 - w0), 2),
        "new_tokens_per_cpu_s": round(tokens / (c1 - c0), 2) if c1 > c0 else None,
    }


# --------------------------------------------------------------------------- greedy check


def greedy_check(
    merged: Any,
    unmerged: Any,
    tok: Any,
    rows: list[dict[str, Any]],
    n_prompts: int,
    n_tokens: int,
    stops: set[int],
    pad_id: int,
) -> dict[str, Any]:
    """``sample_prompts`` at temperature 0 on the merged model against plain greedy ``generate``.

    Compared at equal batching, which is the pass criterion: each prompt alone (batch 1, no padding),
    and all prompts in one left-padded batch. Reported besides: our batched answers against
    ``generate`` alone (on a GPU, different batch shapes may round differently in bf16, and a random
    model's near-ties turn that into different tokens), and against the unmerged adapter."""
    from character_em.llm.chat import render_prompt

    fixed = [{**r, "n_samples": 1} for r in rows[:n_prompts]]
    prompts = [render_prompt(tok, r["messages"]) for r in fixed]
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))  # as sample_prompts batches

    def ours(batch_size: int) -> list[tuple[str, int]]:
        _n, df = project_batches(
            merged, tok, fixed, batch_size=batch_size, temperature=0.0, top_p=1.0, max_new_tokens=n_tokens, seed=0
        )
        return list(zip(df["answer"].to_list(), df["answer_tokens"].to_list(), strict=True))

    def generated(model: Any, batched: bool) -> list[list[int]]:
        kw = dict(temperature=0.0, top_p=1.0, max_new_tokens=n_tokens, stops=stops, pad_id=pad_id)
        if batched:
            _t, outs = hf_generate_batches(model, prompts, order, batch_size=len(prompts), **kw)
            by_row = dict(zip(order, outs, strict=True))
            return [by_row[i] for i in range(len(prompts))]
        return [hf_generate_batches(model, [p], [0], batch_size=1, **kw)[1][0] for p in prompts]

    def compare(a: list[tuple[str, int]], b: list[list[int]]) -> dict[str, Any]:
        matches, first_diff = 0, []
        for (answer, n_answer), ids in zip(a, b, strict=True):
            same = tok.decode(ids, skip_special_tokens=True).strip() == answer and len(ids) == n_answer
            matches += same
            if not same:
                ours_ids = tok(answer, add_special_tokens=False)["input_ids"]
                first_diff.append(
                    next((k for k, (x, y) in enumerate(zip(ids, ours_ids)) if x != y), min(len(ids), len(ours_ids)))
                )
        return {"matches": matches, "first_difference_token_positions": first_diff}

    alone, batched = ours(1), ours(len(fixed))
    gen_alone = generated(merged, batched=False)
    result: dict[str, Any] = {
        "prompts": len(fixed),
        "max_new_tokens": n_tokens,
        "alone_vs_generate_alone_merged": compare(alone, gen_alone),
        "batched_vs_generate_batched_merged": compare(batched, generated(merged, batched=True)),
        "batched_vs_generate_alone_merged": compare(batched, gen_alone),
        "batched_vs_generate_alone_unmerged_adapter": compare(batched, generated(unmerged, batched=False)),
    }
    result["pass"] = all(
        result[k]["matches"] == len(fixed)
        for k in ("alone_vs_generate_alone_merged", "batched_vs_generate_batched_merged")
    )
    return result


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    torch, transformers = _process.start(args.gpu, args.threads)
    from character_em.llm.chat import stop_token_ids
    from character_em.llm.loading import load_model

    device = "cuda" if args.gpu else "cpu"
    n_q = args.questions or (48 if args.gpu else 16)
    n_s = args.samples or (50 if args.gpu else 8)
    max_new = args.max_new_tokens or (256 if args.gpu else 48)
    bs = args.batch_size or (256 if args.gpu else 32)
    repeats = args.repeats or (1 if args.gpu else 3)
    g_tokens = args.greedy_tokens or (64 if args.gpu else 24)
    wanted = ["baseline"] + [r for r in filter(None, args.routes.split(",")) if r != "baseline"]
    unknown = [r for r in wanted if r not in ROUTES]
    if unknown:
        raise SystemExit(f"unknown routes {unknown}; known: {', '.join(ROUTES)}")
    skipped = {
        r: "needs a GPU (static cache + torch.compile are GPU routes)" for r in wanted if r in GPU_ONLY and not args.gpu
    }
    routes = [r for r in wanted if r not in skipped]

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sample_throughput_"))
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model_dir = build_model(args, workdir)
    adapter_dir = build_adapter(model_dir, workdir / f"adapter_r{args.lora_r}", args.lora_r, args.seed, device)
    build_s = time.perf_counter() - t

    t = time.perf_counter()
    unmerged, tok, info_u = load_model(model_dir, quantization="none", adapter=adapter_dir, merge=False, device=device)
    merged, _tok, info_m = load_model(model_dir, quantization="none", adapter=adapter_dir, merge=True, device=device)
    load_s = time.perf_counter() - t
    stops = stop_token_ids(merged, tok)
    pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else min(stops))

    rows = prompt_rows(n_q, n_s)
    prompts, order = expanded_prompts(tok, rows)
    common = {"batch_size": bs, "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": max_new}

    def run_route(name: str, warmup: bool = False) -> int:
        lim = 1 if warmup else None
        kw = dict(common)
        if warmup and name != "hf_generate_merged_static_compiled":
            # A short first batch warms kernels and the allocator. The static route warms with the full
            # token budget: its compiled graphs are specialised to the cache length.
            kw["max_new_tokens"] = min(8, max_new)
        if name == "baseline":
            return hf_generate_batches(unmerged, prompts, order, stops=stops, pad_id=pad_id, limit_batches=lim, **kw)[0]
        if name == "hf_generate_merged":
            return hf_generate_batches(merged, prompts, order, stops=stops, pad_id=pad_id, limit_batches=lim, **kw)[0]
        if name == "hf_generate_merged_static_compiled":
            extra = {"cache_implementation": "static"}
            return hf_generate_batches(
                merged, prompts, order, stops=stops, pad_id=pad_id, extra=extra, limit_batches=lim, **kw
            )[0]
        model = merged if name == "project" else unmerged
        use = [{**r, "n_samples": min(int(r["n_samples"]), bs)} for r in rows[:1]] if warmup else rows
        return project_batches(model, tok, use, seed=args.seed, **kw)[0]

    errors: dict[str, str] = {}
    warm_s: dict[str, float] = {}
    for name in list(routes):  # untimed warm-up: allocator, kernels, and for the static route, compilation
        t = time.perf_counter()
        try:
            run_route(name, warmup=True)
        except Exception as exc:  # a GPU-only route that fails must not sink the rest
            if name == "baseline" or name == "project":
                raise
            errors[name] = repr(exc)[:500]
            routes.remove(name)
        warm_s[name] = round(time.perf_counter() - t, 2)

    runs: dict[str, list[dict[str, float]]] = {r: [] for r in routes}
    for rep in range(repeats):
        for name in routes:
            if name in errors:
                continue
            torch.manual_seed(args.seed + rep)  # plain generate samples from the global generator
            if args.profile and name == "project" and rep == 0:
                import cProfile

                prof = cProfile.Profile()
                res = timed(lambda: prof.runcall(run_route, name))
                Path(args.profile).parent.mkdir(parents=True, exist_ok=True)
                prof.dump_stats(args.profile)
            else:
                try:
                    res = timed(lambda: run_route(name))
                except Exception as exc:  # an optional route failing late (e.g. out of memory) is reported
                    if name in ("baseline", "project"):
                        raise
                    errors[name] = repr(exc)[:500]
                    continue
            runs[name].append(res)
            print(json.dumps({"repeat": rep, "route": name, **res}), flush=True)
    for name in errors:
        runs.pop(name, None)

    greedy = greedy_check(merged, unmerged, tok, rows, args.greedy_prompts, g_tokens, stops, pad_id)
    print(json.dumps({"greedy": greedy}), flush=True)

    dev_name = torch.cuda.get_device_name(0) if args.gpu else f"cpu ({platform.machine()}, {args.threads} thread)"
    metric = "new_tokens_per_s" if args.gpu else "new_tokens_per_cpu_s"
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        entry: dict[str, Any] = {}
        for key in ("new_tokens_per_s", "new_tokens_per_cpu_s"):
            values = [x[key] for x in rs]
            entry[key] = values
            entry[f"{key}_median"] = round(statistics.median(values), 2) if None not in values else None
            if name != "baseline" and None not in values:
                base = [x[key] for x in runs["baseline"]]
                ratios = [v / b for v, b in zip(values, base, strict=True)]  # paired: same repeat
                entry[f"ratio_{key}_median"] = round(statistics.median(ratios), 3)
                entry[f"ratio_{key}"] = [round(x, 3) for x in ratios]
        entry["new_tokens"] = [x["new_tokens"] for x in rs]
        entry["warmup_s"] = warm_s.get(name)
        if name != "baseline":
            entry["ratio_vs_baseline_median"] = entry.get(f"ratio_{metric}_median")
        summary[name] = entry

    versions = _process.package_versions("torch", "transformers", "peft")
    cfg = json.loads((model_dir / "config.json").read_text())
    result = {
        "benchmark": "sample_throughput",
        "device": dev_name,
        "gpu": bool(args.gpu),
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions,
        "python": platform.python_version(),
        "model": ("random Llama-3.1-8B shape" if args.gpu else "tiny random Llama (character_em.llm.tiny)"),
        "model_shape": {
            k: cfg.get(k)
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
        },
        "dtype": info_m["dtype"],
        "adapter": {
            "r": args.lora_r,
            "targets": "all 7 projections",
            "merged_load": info_m["merged"],
            "unmerged_load": not info_u["merged"],
        },
        "workload": {
            "prompt_rows": len(rows),
            "samples_per_row": n_s,
            "answers": len(prompts),
            "mean_prompt_tokens": round(statistics.mean(len(p) for p in prompts), 1),
            "max_new_tokens": max_new,
            "batch_size": bs,
            "temperature": args.temperature,
            "top_p": args.top_p,
        },
        "repeats": repeats,
        "threads": None if args.gpu else args.threads,
        "model_build_s": round(build_s, 1),
        "load_both_s": round(load_s, 1),
        "metric": metric,
        "routes": summary,
        "skipped": skipped,
        "errors": errors,
        "greedy": greedy,
        "correct": greedy["pass"],
        "note": "new tokens = answer tokens before the first end-of-turn token; new_tokens_per_s uses the wall "
        "clock, new_tokens_per_cpu_s this process's CPU time; ratios are medians of per-repeat (paired) ratios "
        "measured in this one run; ratio_vs_baseline_median uses `metric`",
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if not args.gpu else _process.device_slug(dev_name)
    out = out_dir / f"sample_throughput_{slug}{args.tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    base = summary["baseline"][f"{metric}_median"]
    for name, entry in summary.items():
        if name != "baseline":
            print(
                f"| {dev_name} | {name} | {metric} | {base:,.0f} | {entry[f'{metric}_median']:,.0f} | "
                f"{entry['ratio_vs_baseline_median']:.2f}x |"
            )
    print(
        "greedy: "
        + ", ".join(f"{k} {v['matches']}/{greedy['prompts']}" for k, v in greedy.items() if isinstance(v, dict))
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0 if greedy["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
