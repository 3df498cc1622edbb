"""Multi-LoRA sampling on one vLLM engine, as one sampling job per model and seed runs it (docs/vllm.md).

Three routes on one engine started once with LoRA enabled (``max_loras`` = the adapter count), every
route through ``character_em.sampling.vllm_backend.sample_wave_vllm`` (the code the workflow runs), on
the same em prompt rows and token budget:

* ``base``: every request without an adapter.
* ``one_adapter``: every request on one adapter (a job of one adapter, as sampling ran before the waves).
* ``multi_lora``: the same number of requests spread over ``--adapters`` adapters, all in flight
  together (a wave: a model's conditions of one seed).

New tokens/s is wall clock, engine start excluded (and recorded). The headline the estimate reads is
``multi_lora.new_tokens_per_s`` with ``multi_lora.adapters`` (report/estimate.py, from
``benchmarks/results/multilora_throughput_gpu.json``). Where ``sample_throughput_gpu.json`` of the same
run sits in ``--out-dir`` (benchmarks/gpu_all.sh runs it first), the plain-``generate`` anchor's figure
is copied beside it, with the ratio.

Adapters are random LoRA weights (rank ``--lora-r`` on every attention and MLP projection), written
straight from the model's config.json shapes, so no weights are loaded to make them. On a GPU the model
is gpu_all.sh's random 8B-shaped Llama (``--workdir``, built by sample_throughput.py). On a CPU
(``--model DIR --smoke``, vLLM's CPU build) the script runs end to end on a small model as a check of
the script, not as a measurement.

    python benchmarks/multilora_throughput.py --workdir DIR [--adapters 8 --questions 8 --samples 16]
    python benchmarks/multilora_throughput.py --model DIR --smoke --out-dir /tmp/out     # CPU check

Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", help="gpu_all.sh's work folder (llama8b_shape/ from sample_throughput.py)")
    where.add_argument("--model", help="a local model folder (CPU check: SmolLM2-135M-Instruct or a tiny model)")
    ap.add_argument("--adapters", type=int, default=8, help="adapters in the multi-LoRA route (default 8)")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16, help="answers per prompt row and adapter")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--lora-r", type=int, default=32, help="adapter rank (config.yaml's train default: 32)")
    ap.add_argument("--smoke", action="store_true", help="CPU check: fp32, tiny workload, writes *_cpu.json")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def lora_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each targeted projection of a Llama-like decoder layer."""
    hidden, inner = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inner),
        "up_proj": (hidden, inner),
        "down_proj": (inner, hidden),
    }


def write_random_adapter(model: Path, out: Path, *, r: int, seed: int, dtype: str) -> Path:
    """A PEFT LoRA adapter folder with random non-zero A and B on every projection of every layer."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((model / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for name, (fan_in, fan_out) in lora_shapes(config).items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{name}"
            a = torch.randn(r, fan_in, generator=generator) * (1.0 / fan_in**0.5)
            b = torch.randn(fan_out, r, generator=generator) * 0.02
            tensors[f"{prefix}.lora_A.weight"] = a.to(getattr(torch, dtype)).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(getattr(torch, dtype)).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model),
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(TARGETS),
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out


def count_params(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in sorted(model.glob("*.safetensors")):  # headers only: no weights are read
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                n = 1
                for d in handle.get_slice(key).get_shape():
                    n *= int(d)
                total += n
    return total


def run_route(engine: Any, model: Path, request_sets: list[dict[str, Any]], args: argparse.Namespace) -> dict:
    from character_em.sampling.vllm_backend import sample_wave_vllm

    started = time.perf_counter()
    frames, stats = sample_wave_vllm(
        str(model), request_sets, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens,
        base_seed=args.seed, max_lora_rank=args.lora_r, engine=engine, progress=False, save_seconds=None,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    answers = sum(frame.height for frame in frames)
    new_tokens = sum(int(frame["answer_tokens"].sum()) for frame in frames)
    return {
        "answers": answers,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "new_tokens_per_s": new_tokens / seconds,
        "prompt_tokens": stats["prompt_tokens"],
        "prompt_tokens_cached": stats["prompt_tokens_cached"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.questions, args.samples, args.max_new_tokens = min(args.questions, 3), min(args.samples, 2), 8
        args.adapters, args.lora_r = min(args.adapters, 3), min(args.lora_r, 16)
    from character_em.evals import suites
    from character_em.sampling import vllm_backend as V

    model = Path(args.model) if args.model else Path(args.workdir) / "llama8b_shape"
    work = Path(args.workdir) if args.workdir else Path(args.out_dir) / "multilora_work"
    dtype = "float32" if args.smoke else "bfloat16"
    adapters = [
        write_random_adapter(
            model, work / f"adapter_r{args.lora_r}_{k}", r=args.lora_r, seed=args.seed + k, dtype=dtype
        )
        for k in range(args.adapters)
    ]
    rows = suites.build_prompts(
        "em", {"n_samples": args.samples, "max_questions": args.questions, "formats": ["plain"]}
    )
    longest = 4 * max(len(row["question"]) for row in rows) + 256  # characters -> a generous token bound

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    out: dict[str, Any] = {
        "device": device,
        "params_b": count_params(model) / 1e9,
        "model": str(model),
        "lora_r": args.lora_r,
        "dtype": dtype,
        "answers_per_route": len(adapters) * sum(row["n_samples"] for row in rows),
        "max_new_tokens": args.max_new_tokens,
    }
    started = time.perf_counter()
    engine = V.start_engine(
        str(model), lora=True, max_lora_rank=args.lora_r, max_loras=len(adapters), max_cpu_loras=len(adapters),
        max_model_len=longest + args.max_new_tokens, dtype="fp32" if args.smoke else "bf16", base_seed=args.seed,
    )  # fmt: skip
    out["engine_start_s"] = time.perf_counter() - started

    def sets(adapter_of: list[Path | None]) -> list[dict[str, Any]]:
        return [
            {
                "adapter": str(a) if a else None,
                "prompts": rows,
                "identity": {"model": "bench", "condition": f"c{k}", "seed": 0},
            }
            for k, a in enumerate(adapter_of)
        ]

    n = len(adapters)
    # Warm-up, untimed: each adapter loaded once, kernels compiled.
    warm = [{**row, "n_samples": 1} for row in rows[:1]]
    for adapter in [None, *adapters]:
        run_route(engine, model, [{**sets([adapter])[0], "prompts": warm}], args)
    # Same request count in every route: n copies of the prompt rows.
    out["base"] = run_route(engine, model, sets([None] * n), args)
    out["one_adapter"] = run_route(engine, model, sets([adapters[0]] * n), args)
    out["multi_lora"] = {"adapters": n, **run_route(engine, model, sets(list(adapters)), args)}
    out["multi_lora_vs_one_adapter"] = out["multi_lora"]["new_tokens_per_s"] / out["one_adapter"]["new_tokens_per_s"]
    out["one_adapter_vs_base"] = out["one_adapter"]["new_tokens_per_s"] / out["base"]["new_tokens_per_s"]
    anchor = Path(args.out_dir) / ("sample_throughput_cpu.json" if args.smoke else "sample_throughput_gpu.json")
    if anchor.is_file() and not args.smoke:
        baseline = json.loads(anchor.read_text()).get("routes", {}).get("baseline", {})
        rate = baseline.get("new_tokens_per_s_median")
        if rate:
            out["plain_generate"] = {"source": anchor.name, "new_tokens_per_s": rate}
            out["multi_lora_vs_plain_generate"] = out["multi_lora"]["new_tokens_per_s"] / rate
    engine.llm_engine.engine_core.shutdown()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    name = "multilora_throughput_cpu_smoke.json" if args.smoke else "multilora_throughput_gpu.json"
    (Path(args.out_dir) / name).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":  # vLLM's workers start with spawn
    raise SystemExit(main())
