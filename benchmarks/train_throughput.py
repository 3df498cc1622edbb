"""Training throughput of the project's path against the public EM recipe, measured in one run.

Both paths go through ``character_em.train.trainer.prepare_trainer`` and the trainer it builds, on the same
data, seed and examples per optimizer step; only the layout differs:

* ``baseline``: what the public EM scripts do: micro-batch 2, padded to the longest example,
  gradient checkpointing on every layer, no fused kernels.
* ``project``: padding-free packing, gradient checkpointing ``"auto"``, Liger kernels ``"auto"``,
  the configured micro-batch (``config.yaml``'s train settings for ``--model-key``, or
  ``--micro-batch``/``--grad-accum``), plus optional ``--variants`` such as ``16x1`` (micro-batch 16,
  no accumulation: the same 16 examples per optimizer step).

Tokens/s counts real (non-padding) tokens, prompt and answer, over the timed optimizer steps
(the first ``--warmup-steps`` are not timed). Paths are run interleaved, ``--repeats`` times, and
the ratio is the median of the per-repeat ratios, so drift on a shared machine hits both sides.
Correctness: the per-step losses and gradient norms of the first steps must match between paths
(same examples per step, loss normalized over the step); a mismatch exits with status 1.

CPU (default): the tiny random Llama model of ``character_em.llm.tiny``, one thread (a loaded
2-core machine makes multi-threaded timings meaningless). ``--gpu``: a random-weight model with the
Llama-3.1-8B shape (throughput does not depend on weight values), built as
the anchor measurement of docs/anchors.md builds it, with the tiny tokenizer (ids stay below its 2,048
entries; the embedding and LM head keep the full 128,256 rows), and 500 chat examples of about
350 tokens. The GPU mode has not been run in the session that wrote it (no GPU there).

    python benchmarks/train_throughput.py [--gpu] [--repeats 3] [--steps 3] [--variants 16x1]

Writes ``benchmarks/results/train_throughput_{device}.json`` and prints a Markdown table row.
Asserts nothing about time.
"""

from __future__ import annotations

import argparse
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
HPARAMS_SHOWN = (
    "micro_batch_size",
    "grad_accum",
    "packing",
    "gradient_checkpointing",
    "use_liger_kernel",
    "quantization",
    "optim",
)
LLAMA_8B_SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="8B-shaped random model on CUDA (default: tiny model on CPU)")
    ap.add_argument("--config", default=str(ROOT / "config.yaml"), help="project config for the train settings")
    ap.add_argument("--model-key", default=None, help="model whose train settings to use (default: the first)")
    ap.add_argument("--micro-batch", type=int, default=None, help="project micro-batch (default: from config)")
    ap.add_argument("--grad-accum", type=int, default=None, help="project accumulation (default: keeps examples/step)")
    ap.add_argument(
        "--variants",
        default=None,
        help="extra project layouts, e.g. '2x8:gc,8x2,16x1' (MICROxACCUM; ':gc' = checkpoint every layer)",
    )
    ap.add_argument("--n-examples", type=int, default=None, help="chat examples (default: 500 GPU, 96 CPU)")
    ap.add_argument("--mean-tokens", type=int, default=350, help="mean tokens per example (log-normal lengths)")
    ap.add_argument("--warmup-steps", type=int, default=1, help="optimizer steps not timed")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per path")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default: 1 GPU, 3 CPU)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (CPU mode)")
    ap.add_argument("--workdir", default=None, help="where to build the model (default: a temp dir; GPU: reused)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- data


def chat_examples(tok: Any, n: int, mean_tokens: int, seed: int) -> list[list[dict[str, str]]]:
    """``n`` single-turn chats whose token counts are log-normal with the given mean (clipped 64..1024).

    Text is drawn from the tiny model's own corpus, so every word is in its vocabulary. About a
    fifth of each example is the question, the rest the answer; a third get a system prompt.
    """
    from character_em.llm.tiny import builtin_corpus

    rng = random.Random(seed)
    sentences = [s.replace("\n", " ") for s in builtin_corpus()]
    cost = [len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in sentences]
    sigma = 0.5
    mu = math.log(mean_tokens) - sigma**2 / 2  # mean of the log-normal = mean_tokens

    def text(budget: int) -> str:
        out, used = [], 0
        while used < budget:
            i = rng.randrange(len(sentences))
            out.append(sentences[i])
            used += cost[i]
        return " ".join(out)

    convs = []
    for i in range(n):
        target = int(min(max(rng.lognormvariate(mu, sigma), 64), 1024)) - 12  # ~12 template tokens
        q = max(8, target // 5)
        msgs = [{"role": "system", "content": "Answer the question."}] if i % 3 == 0 else []
        msgs += [{"role": "user", "content": text(q)}, {"role": "assistant", "content": text(target - q)}]
        convs.append(msgs)
    return convs


def train_settings(config_path: str, model_key: str | None) -> tuple[str, dict[str, Any], str | None]:
    """(model key, its resolved train settings, note). Validated through the project's config loader;
    where jsonschema is missing (a bare GPU image), schema defaults + the YAML's train blocks, unvalidated."""
    import yaml

    from character_em.config import deep_merge, load_schema

    try:
        from character_em.config import load_config, resolve_train_params

        config = load_config(config_path)
        key = model_key or next(iter(config["models"]))
        return key, resolve_train_params(config, key, "benchmark"), None
    except ImportError as exc:
        raw = yaml.safe_load(Path(config_path).read_text()) or {}
        defaults = {k: v["default"] for k, v in load_schema()["properties"]["train"]["properties"].items()}
        key = model_key or next(iter(raw["models"]))
        merged = deep_merge(deep_merge(defaults, raw.get("train") or {}), raw["models"][key].get("train") or {})
        return key, merged, f"config not validated ({exc!r}); schema defaults merged with {config_path}"


# --------------------------------------------------------------------------- models


def build_cpu_model(workdir: Path) -> Path:
    from character_em.llm.tiny import build_tiny_model

    return build_tiny_model(workdir / "tiny", style="llama", seed=0)


def build_gpu_model(workdir: Path) -> Path:
    """Random Llama-3.1-8B-shaped weights in bf16 with the tiny chat tokenizer (not run here: no GPU)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from character_em.llm.tiny import build_tiny_model

    out = workdir / "llama8b_shape"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out  # reuse on a warm machine
    tiny = build_tiny_model(workdir / "tiny_tok", style="llama", seed=0)
    tcfg = json.loads((tiny / "config.json").read_text())
    cfg = LlamaConfig(
        **LLAMA_8B_SHAPE,
        bos_token_id=tcfg["bos_token_id"],
        eos_token_id=tcfg["eos_token_id"],
        pad_token_id=tcfg["pad_token_id"],
    )
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.generation_config.pad_token_id = tcfg["pad_token_id"]
    model.save_pretrained(out, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


# --------------------------------------------------------------------------- timing


def run_path(
    name: str,
    base_model: str,
    convs: list[list[dict[str, str]]],
    hparams: dict[str, Any],
    seed: int,
    warmup: int,
    workdir: Path,
) -> dict[str, Any]:
    """Train ``warmup + steps`` optimizer steps through the project's trainer; time all but the warm-up."""
    import gc

    import torch
    from transformers import PrinterCallback, TrainerCallback

    from character_em.train.trainer import prepare_trainer

    on_gpu = torch.cuda.is_available()
    marks: list[tuple[float, float, int, int]] = []  # wall clock, process CPU time, tokens, step
    logs: list[dict[str, float]] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if on_gpu:
                torch.cuda.synchronize()
            tokens, step = int(state.num_input_tokens_seen), int(state.global_step)
            marks.append((time.perf_counter(), time.process_time(), tokens, step))

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            marks.append((time.perf_counter(), time.process_time(), 0, 0))

    t_load = time.perf_counter()
    prepared = prepare_trainer(
        base_model=base_model,
        conversations=convs,
        checkpoint_dir=workdir / f"ck_{name}",
        hparams=hparams,
        seed=seed,
        callbacks=[Clock()],
    )
    load_s = time.perf_counter() - t_load
    trainer = prepared.trainer
    trainer.remove_callback(PrinterCallback)  # one JSON line per path is printed instead
    trainer.train()
    for row in trainer.state.log_history:
        if "loss" in row:
            logs.append({"step": int(row["step"]), "loss": float(row["loss"]), "grad_norm": float(row["grad_norm"])})
    (t0, c0, tok0, _), (t1, c1, tok1, step1) = marks[warmup], marks[-1]
    peak = torch.cuda.max_memory_allocated() if on_gpu else None
    out = {
        "name": name,
        "tokens_per_s": round((tok1 - tok0) / (t1 - t0), 2),
        # Tokens per second of this process's own CPU time: on a shared CPU machine, time taken by
        # other processes does not count against either path. Meaningless on a GPU (kernels run async).
        "tokens_per_cpu_s": round((tok1 - tok0) / (c1 - c0), 2) if c1 > c0 else None,
        "timed_tokens": tok1 - tok0,
        "timed_seconds": round(t1 - t0, 3),
        "timed_cpu_seconds": round(c1 - c0, 3),
        "timed_steps": step1 - warmup,
        "load_and_prepare_s": round(load_s, 2),
        "peak_gpu_memory_gib": round(peak / 2**30, 2) if peak is not None else None,
        "steps": logs,
        "speed": prepared.speed,
        "quantization": prepared.load_info["quantization"],
        "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
    }
    del trainer, prepared
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return out


def compare_steps(a: list[dict[str, float]], b: list[dict[str, float]]) -> dict[str, float]:
    n = min(len(a), len(b))
    rel = lambda x, y: abs(x - y) / max(abs(x), 1e-12)  # noqa: E731
    return {
        "steps_compared": n,
        "max_rel_loss_diff": max(rel(a[i]["loss"], b[i]["loss"]) for i in range(n)),
        "max_rel_grad_norm_diff": max(rel(a[i]["grad_norm"], b[i]["grad_norm"]) for i in range(n)),
    }


# --------------------------------------------------------------------------- main


def markdown_rows(result: dict[str, Any]) -> str:
    """One Markdown table row per project path: device, path, metric, baseline, path, ratio, check."""
    metric = result["metric"]
    base = result["paths"]["baseline"][f"{metric}_median"]
    rows = []
    for name, entry in result["paths"].items():
        if name == "baseline":
            continue
        hp = entry["hparams"]
        layout = f"{hp['micro_batch_size']}x{hp['grad_accum']}, packed, checkpointing {hp['gradient_checkpointing']}"
        check = "match" if entry["matches_baseline"]["pass"] else "MISMATCH"
        rows.append(
            f"| {result['device']} | {name} ({layout}) | {metric} | {base:,.0f} | "
            f"{entry[f'{metric}_median']:,.0f} | {entry['ratio_vs_baseline_median']:.2f}x | {check} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    torch, transformers = _process.start(args.gpu, args.threads)
    from character_em.llm.loading import load_tokenizer

    repeats = args.repeats or (1 if args.gpu else 3)
    n_examples = args.n_examples or (500 if args.gpu else 96)

    model_key, configured, config_note = train_settings(args.config, args.model_key)
    per_step = int(configured["micro_batch_size"]) * int(configured["grad_accum"])
    micro = args.micro_batch or int(configured["micro_batch_size"])
    accum = args.grad_accum or max(1, per_step // micro)
    per_step = micro * accum
    if per_step % 2:
        raise SystemExit(f"examples per step ({per_step}) must be even: the baseline uses micro-batch 2")
    max_steps = args.warmup_steps + args.steps
    common = {
        **configured,
        "max_steps": max_steps,
        "save_steps": 10**9,  # never checkpoint inside the timed steps
        "max_seq_length": max(int(configured["max_seq_length"]), 1024),
    }
    paths: dict[str, dict[str, Any]] = {
        "baseline": {
            **common,
            "micro_batch_size": 2,
            "grad_accum": per_step // 2,
            "packing": False,
            "gradient_checkpointing": True,
            "use_liger_kernel": False,
        },
        "project": {
            **common,
            "micro_batch_size": micro,
            "grad_accum": accum,
            "packing": True,
            "gradient_checkpointing": "auto",
            "use_liger_kernel": "auto",
        },
    }
    for spec in filter(None, (args.variants or "").split(",")):
        layout, _, flag = spec.lower().partition(":")
        m, a = (int(x) for x in layout.split("x"))
        if m * a != per_step or flag not in ("", "gc"):
            raise SystemExit(f"variant {spec}: want MxA[:gc] with M*A = {per_step} examples per optimizer step")
        variant = {**paths["project"], "micro_batch_size": m, "grad_accum": a}
        if flag == "gc":  # packing alone, checkpointing every layer as the baseline does
            variant["gradient_checkpointing"] = True
        paths[f"project_{m}x{a}" + ("_gc" if flag else "")] = variant

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="train_throughput_"))
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model_dir = build_gpu_model(workdir) if args.gpu else build_cpu_model(workdir)
    build_s = time.perf_counter() - t
    tok = load_tokenizer(model_dir)
    convs = chat_examples(tok, n_examples, args.mean_tokens, args.seed)
    lengths = [len(tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in convs]

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    for r in range(repeats):
        for name, hp in paths.items():
            res = run_path(name, str(model_dir), convs, hp, args.seed, args.warmup_steps, workdir)
            runs[name].append(res)
            print(
                json.dumps(
                    {
                        "repeat": r,
                        "path": name,
                        "tokens_per_s": res["tokens_per_s"],
                        "tokens_per_cpu_s": res["tokens_per_cpu_s"],
                        "peak_gpu_memory_gib": res["peak_gpu_memory_gib"],
                    }
                ),
                flush=True,
            )

    device = torch.cuda.get_device_name(0) if args.gpu else f"cpu ({platform.machine()}, {args.threads} thread)"
    # Headline metric: wall clock on a GPU; on a CPU, this process's CPU time (see run_path).
    metric = "tokens_per_s" if args.gpu else "tokens_per_cpu_s"
    tol = {"max_rel_loss_diff": 2e-3, "max_rel_grad_norm_diff": 5e-2}
    summary: dict[str, Any] = {}
    ok = True
    for name, rs in runs.items():
        entry: dict[str, Any] = {}
        for key in ("tokens_per_s", "tokens_per_cpu_s"):
            values = [x[key] for x in rs]
            entry[f"{key}_median"] = round(statistics.median(values), 2) if None not in values else None
            entry[key] = values
            if name != "baseline" and None not in values:
                base = [x[key] for x in runs["baseline"]]
                ratios = [v / b for v, b in zip(values, base, strict=True)]  # paired: same repeat
                entry[f"ratio_{key}_median"] = round(statistics.median(ratios), 3)
                entry[f"ratio_{key}"] = [round(x, 3) for x in ratios]
        entry.update(
            {
                "hparams": {k: paths[name][k] for k in HPARAMS_SHOWN},
                "speed": rs[0]["speed"],
                "optim_used": rs[0]["optim"],
                "quantization_used": rs[0]["quantization"],
                "peak_gpu_memory_gib": rs[0]["peak_gpu_memory_gib"],
                "steps_first_repeat": rs[0]["steps"],
            }
        )
        if name != "baseline":
            entry["ratio_vs_baseline_median"] = entry[f"ratio_{metric}_median"]
            check = compare_steps(runs["baseline"][0]["steps"], rs[0]["steps"])
            check["pass"] = all(check[k] <= v for k, v in tol.items())
            ok &= check["pass"]
            entry["matches_baseline"] = check
        summary[name] = entry

    versions = _process.package_versions(
        "torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel", "flash-attn"
    )
    result = {
        "benchmark": "train_throughput",
        "device": device,
        "gpu": bool(args.gpu),
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions,
        "python": platform.python_version(),
        "model": "random Llama-3.1-8B shape" if args.gpu else "tiny random Llama (character_em.llm.tiny defaults)",
        "model_params": None,
        "config_model_key": model_key,
        "config_note": config_note,
        "data": {
            "n_examples": n_examples,
            "mean_tokens": round(statistics.mean(lengths), 1),
            "max_tokens": max(lengths),
            "examples_per_optimizer_step": per_step,
        },
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.steps,
        "repeats": repeats,
        "threads": None if args.gpu else args.threads,
        "model_build_s": round(build_s, 1),
        "tolerance": tol,
        "correct": ok,
        "paths": summary,
        "metric": metric,
        "note": "tokens = real (non-padding) prompt and answer tokens over the timed optimizer steps; "
        "tokens_per_s uses the wall clock, tokens_per_cpu_s this process's CPU time; ratios are medians "
        "of per-repeat (paired) ratios measured in this one run; ratio_vs_baseline_median uses `metric`",
    }
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
        kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * (h // cfg["num_attention_heads"])
        result["model_params"] = n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + 2 * v * h + h
    except (OSError, KeyError, ValueError):
        pass
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if not args.gpu else _process.device_slug(device)
    out = out_dir / f"train_throughput_{slug}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_rows(result))
    print(f"wrote {out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
