"""QLoRA fine-tuning of one adapter with TRL's SFTTrainer and peft LoRA.

Loss mask. Each example is split TRL-style into a prompt (every message before the final assistant
turn, rendered with the generation prompt) and a completion (the final assistant message). We
tokenize it here rather than letting TRL do it, for two reasons checked against TRL 1.16's own
prompt-completion path:

* TRL labels everything after the prompt, so under ChatML the ``\\n`` that follows ``<|im_end|>`` is
  trained too. Here the sequence ends at the assistant's end-of-turn token: labels cover exactly the
  answer plus that token, and nothing dangles after it.
* TRL silently drops examples left fully masked by truncation. Here that is an error.

The pre-tokenized dataset (``input_ids`` + ``labels``) goes through SFTTrainer's normal preparation
and collator, so what the tests inspect is what the trainer trains on. Every example is used: no
evaluation split.

Resume. Checkpoints live in ``checkpoint_dir`` (outside the workflow's declared outputs, which
Snakemake deletes before a rerun). A run restarts from the latest complete checkpoint whose run key
(hyper-parameters, seed, data hash, base model) matches. SIGTERM saves a checkpoint at the end of
the current optimizer step and exits with status 143. The per-step log is kept beside the
checkpoints and copied into ``output_dir`` at the end, so it continues across a resume.

Saved steps (``eval_steps``, docs/trajectories.md). The adapter is also saved at the optimizer steps
the hparam lists (integers are steps, floats are epochs, resolved by ``config.resolve_eval_steps``),
each into ``steps_dir/<label>/`` with a ``step.json`` naming its step and the run key's hash. Like the
checkpoints, ``steps_dir`` lies outside the declared outputs. A fresh run empties it; a resumed run
keeps the steps saved up to its checkpoint and saves the later ones again, so every saved step comes
from the same trajectory as the final adapter. Each is written to a temporary folder and renamed.

Speed (docs/anchors.md; what was used is recorded under ``speed`` in run.json):

* ``packing``: padding-free micro-batches. The examples of a micro-batch are concatenated into one
  row with ``position_ids`` restarting at 0 for each example, and no padding. This is TRL's
  ``padding_free`` collator, not its bin packing: bins of ``max_seq_length`` tokens would change how
  many examples an optimizer step sees (about 6x fewer steps for 500 chat examples), which changes
  the recipe. Here the same examples make the same optimizer steps as without packing; only the
  layout changes. Attention stays inside each example through the varlen path of flash attention,
  or a block-diagonal mask that transformers derives from the position ids for sdpa/eager/flex.
  Before training, ``check_packing_isolation`` verifies that on the loaded model; if it fails,
  training falls back to padded batches and says why.
* ``gradient_checkpointing``: ``true``, ``false`` or ``"auto"``. ``auto`` estimates the activation
  memory of the largest possible micro-batch of this dataset and checkpoints only when it would not
  fit in the memory left after loading the model, and then only every n-th layer where that fits.
* Liger kernels (``use_liger_kernel``: optional hparam, default ``"auto"``): used on CUDA when the
  ``liger-kernel`` package is installed (the ``liger`` extra). Never on CPU.

CLI: ``python -m character_em.train.trainer --base-model M --data D --output-dir O --checkpoint-dir C
--hparams JSON --seed N``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import platform
import resource
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from character_em.config import resolve_eval_steps, steps_per_epoch
from character_em.files import write_text_atomic
from character_em.hashing import sha256_file, sha256_json
from character_em.llm.chat import end_of_turn_ids
from character_em.train.steps import STEP_INFO

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "GRADIENT_CHECKPOINTING_SETTINGS",
    "HPARAM_KEYS",
    "OPTIONAL_HPARAMS",
    "PreparedTrainer",
    "TrainingInterrupted",
    "activation_bytes_per_token",
    "build_example",
    "build_train_dataset",
    "check_packing_isolation",
    "decide_gradient_checkpointing",
    "prepare_trainer",
    "read_messages",
    "resolve_liger",
    "train_adapter",
]

log = logging.getLogger(__name__)

HPARAM_KEYS = frozenset(
    {
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "target_modules",
        "learning_rate",
        "num_epochs",
        "micro_batch_size",
        "grad_accum",
        "warmup_steps",
        "lr_scheduler",
        "weight_decay",
        "optim",
        "max_seq_length",
        "quantization",
        "packing",
        "gradient_checkpointing",
        "save_steps",
        "max_steps",
    }
)

# Optional keys and their defaults (not yet in the config schema; accepted when present).
OPTIONAL_HPARAMS: dict[str, Any] = {"use_liger_kernel": "auto", "eval_steps": []}
GRADIENT_CHECKPOINTING_SETTINGS = (True, False, "auto")

_STEP_LOG = "train_log.jsonl"
_RUN_KEY = "run_key.json"
_STEP_INFO = STEP_INFO
_SIGTERM_EXIT = 143


class TrainingInterrupted(SystemExit):
    """Raised after SIGTERM once a checkpoint is saved; exits the process with status 143."""


# --------------------------------------------------------------------------- data


def read_messages(data_path: str | Path) -> list[list[dict[str, str]]]:
    """Read train.jsonl ({"messages": [...]} per line); each must end with an assistant turn."""
    out: list[list[dict[str, str]]] = []
    with Path(data_path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(msgs, list) or len(msgs) < 2:
                raise ValueError(f"{data_path}:{lineno}: expected {{'messages': [...]}} with >= 2 turns")
            if msgs[-1].get("role") != "assistant":
                raise ValueError(f"{data_path}:{lineno}: the last message must be the assistant's answer")
            out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if not out:
        raise ValueError(f"{data_path}: no training examples")
    return out


def _chat_ids(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], gen_prompt: bool) -> list[int]:
    enc = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen_prompt, return_dict=True)
    return list(enc["input_ids"])


def build_example(
    tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_length: int | None = None
) -> dict[str, list[int]]:
    """Tokenize one conversation; labels = final assistant answer + its end-of-turn token, else -100.

    The prompt is rendered with the generation prompt (exactly what the model sees at inference);
    the full conversation without it, so no assistant header dangles after the answer. Tokens the
    template puts after the end-of-turn token (ChatML's newline) are dropped.
    """
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's answer")
    prompt = _chat_ids(tok, messages[:-1], gen_prompt=True)
    full = _chat_ids(tok, messages, gen_prompt=False)
    if full[: len(prompt)] != prompt:
        raise ValueError(
            "the chat template renders the prompt differently on its own than inside the full conversation; "
            f"prompt ends {tok.decode(prompt[-8:])!r}, full continues {tok.decode(full[len(prompt) - 8 : len(prompt) + 8])!r}"
        )
    completion = full[len(prompt) :]
    eot = end_of_turn_ids(tok)
    end = next((i for i, t in enumerate(completion) if t in eot), None)
    if end is None:
        raise ValueError(
            f"no end-of-turn token ({sorted(eot)}) after the assistant answer; the model would never learn to stop"
        )
    completion = completion[: end + 1]
    input_ids = prompt + completion
    labels = [-100] * len(prompt) + completion
    if max_length is not None and len(input_ids) > max_length:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def build_train_dataset(
    tok: PreTrainedTokenizerBase, conversations: list[list[dict[str, str]]], max_length: int
) -> tuple[Any, dict[str, int]]:
    """A ``datasets.Dataset`` of input_ids/labels for every conversation, plus token statistics.

    Raises if truncation to ``max_length`` would leave an example with no supervised token: it would
    otherwise be dropped silently.
    """
    from datasets import Dataset

    rows = []
    n_truncated = 0
    for i, msgs in enumerate(conversations):
        ex = build_example(tok, msgs)
        if len(ex["input_ids"]) > max_length:
            n_truncated += 1
            ex = {k: v[:max_length] for k, v in ex.items()}
            if all(x == -100 for x in ex["labels"]):
                raise ValueError(
                    f"example {i}: the prompt alone fills max_seq_length={max_length}; raise max_seq_length"
                )
        rows.append(ex)
    stats = {
        "n_examples": len(rows),
        "n_truncated": n_truncated,
        "n_tokens": sum(len(r["input_ids"]) for r in rows),
        "n_supervised_tokens": sum(sum(1 for x in r["labels"] if x != -100) for r in rows),
    }
    if n_truncated:
        log.warning("%d of %d examples truncated to max_seq_length=%d", n_truncated, len(rows), max_length)
    return Dataset.from_list(rows), stats


# --------------------------------------------------------------------------- helpers


def check_hparams(hparams: dict[str, Any]) -> None:
    missing = HPARAM_KEYS - hparams.keys()
    unknown = hparams.keys() - HPARAM_KEYS - OPTIONAL_HPARAMS.keys()
    if missing or unknown:
        raise ValueError(f"hparams: missing {sorted(missing)}, unknown {sorted(unknown)}")
    if hparams["quantization"] not in ("nf4", "none"):
        raise ValueError(f"hparams.quantization must be 'nf4' or 'none', got {hparams['quantization']!r}")
    for key in ("gradient_checkpointing", "use_liger_kernel"):
        value = hparams.get(key, "auto")
        # `1 in (True, ...)` is true in Python: require real booleans.
        if not (isinstance(value, bool) or value == "auto"):
            raise ValueError(f"hparams.{key} must be true, false or 'auto', got {value!r}")


def _resolve_optim(optim: str, device: str) -> tuple[str, str | None]:
    """Return (optimizer name, fallback note). 8-bit optimizers fall back to adamw_torch if unusable."""
    if "8bit" not in optim:
        return optim, None
    try:
        import bitsandbytes as bnb
        import torch

        p = torch.nn.Parameter(torch.randn(8192, device=device))  # >= 4096 elements: really 8-bit state
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.randn_like(p)
        opt.step()
    except Exception as exc:
        note = f"{optim} unavailable on {device} ({exc!r}); used adamw_torch"
        log.warning(note)
        return "adamw_torch", note
    return optim, None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "character-em"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _latest_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """Newest checkpoint-N with trainer_state.json (written last by Trainer); partial ones are removed."""
    found = []
    for p in ckpt_dir.glob("checkpoint-*"):
        suffix = p.name.removeprefix("checkpoint-")
        if p.is_dir() and suffix.isdigit():
            found.append((int(suffix), p))
    for _, p in sorted(found, reverse=True):
        if (p / "trainer_state.json").is_file():
            return p
        log.warning("removing incomplete checkpoint %s", p)
        shutil.rmtree(p, ignore_errors=True)
    return None


def _peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _prune_saved_steps(steps_dir: Path, keep_up_to: int, run_key_sha: str) -> None:
    """Remove saved steps a (resumed) run will redo or that another run wrote, and unfinished ones.

    Kept: folders whose step.json has this run key and a step at or before ``keep_up_to`` (the
    checkpoint the run resumes from; 0 for a fresh run).
    """
    if not steps_dir.is_dir():
        return
    for folder in sorted(steps_dir.iterdir()):
        info_path = folder / _STEP_INFO
        info = json.loads(info_path.read_text()) if info_path.is_file() else None
        if info is None or info.get("run_key_sha256") != run_key_sha or int(info["step"]) > keep_up_to:
            log.info("removing saved step %s (redone by this run)", folder)
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                folder.unlink()


def _save_step(model: Any, steps_dir: Path, target: dict[str, Any], run_key_sha: str, state: Any) -> None:
    """Save the adapter as it is after optimizer step ``target["step"]`` into steps_dir/<label>/."""
    final = steps_dir / target["label"]
    tmp = steps_dir / f".{target['label']}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    info = {
        **{key: target[key] for key in ("label", "entry", "step")},
        "epoch": float(state.epoch or target["epoch"]),
        "run_key_sha256": run_key_sha,
        "trained_tokens": int(state.num_input_tokens_seen),
    }
    write_text_atomic(tmp / _STEP_INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    log.info("saved the adapter at step %d as %s", target["step"], final)


def _truncate_step_log(path: Path, last_step: int) -> None:
    """Keep log lines up to the resumed checkpoint's step (steps after it will be redone)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    write_text_atomic(path, "".join(ln + "\n" for ln in keep))


# --------------------------------------------------------------------------- speed


def check_packing_isolation(model: Any) -> str | None:
    """Return None if packed examples cannot see each other in ``model``'s attention, else why not.

    Two probe rows share the same second example B behind different first examples A and A', with
    position ids restarting at B, exactly as the padding-free collator lays them out. With isolation
    B's logits are the same in both rows (same shapes, same kernels, so equal up to rounding) and
    match B run alone. A leak shows as an O(1) relative change. Called with ``use_cache=False`` as
    the trainer calls it: transformers only derives the block-diagonal mask when no cache is passed.
    """
    import torch

    from character_em.llm.loading import disable_bnb_cpu_repacking

    # Eval mode (no dropout) on a 4-bit CPU model repacks weights unless this flag is off (docs/architecture.md, known traps).
    disable_bnb_cpu_repacking(model)
    device = next(model.parameters()).device
    vocab = int(model.config.get_text_config().vocab_size)
    gen = torch.Generator().manual_seed(1234)
    n_a, n_b = 11, 7
    lo = min(100, vocab // 2)  # ordinary token ids, away from the specials at the start of most vocabularies
    a1, a2 = (torch.randint(lo, vocab, (n_a,), generator=gen) for _ in range(2))
    b = torch.randint(lo, vocab, (n_b,), generator=gen)
    pos = torch.cat([torch.arange(n_a), torch.arange(n_b)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():

            def logits(ids: Any, position_ids: Any) -> Any:
                out = model(input_ids=ids[None].to(device), position_ids=position_ids, use_cache=False)
                return out.logits[0].float()

            row1 = logits(torch.cat([a1, b]), pos)[n_a:]
            row2 = logits(torch.cat([a2, b]), pos)[n_a:]
            alone = logits(b, torch.arange(n_b)[None].to(device))
    except Exception as exc:  # an attention implementation that rejects the layout is not isolation
        return f"packed forward failed: {exc!r}"
    finally:
        model.train(was_training)
    scale = float(alone.abs().max()) or 1.0
    d_rows = float((row1 - row2).abs().max()) / scale
    d_alone = float((row1 - alone).abs().max()) / scale
    # Thresholds far above bf16 rounding (same-shape rows agree to ~1e-3) and far below a leak (~1e-1).
    if d_rows > 1e-2:
        return f"packed example's logits depend on the example before it (relative change {d_rows:.3g})"
    if d_alone > 5e-2:
        return f"packed example's logits differ from the example run alone (relative difference {d_alone:.3g})"
    return None


def _choose_attn_implementation(model: Any, on_gpu: bool, packing: bool) -> str:
    """Flash attention's varlen kernel for padding-free rows on CUDA when installed; else leave sdpa.

    Not run in this project's CI (no GPU, no flash-attn): the isolation check still guards it.
    """
    current = str(getattr(model.config, "_attn_implementation", None) or "eager")
    if on_gpu and packing and importlib.util.find_spec("flash_attn") is not None:
        try:
            model.set_attn_implementation("flash_attention_2")
            return "flash_attention_2"
        except Exception as exc:  # a model or GPU the kernel does not support
            log.warning("flash_attention_2 unavailable (%r); keeping %s", exc, current)
    return current


def resolve_liger(setting: bool | str, on_gpu: bool, installed: bool | None = None) -> tuple[bool, str | None]:
    """Whether to use Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU), and a note when not.

    ``auto``: on CUDA when ``liger-kernel`` is installed. ``true`` without the package on CUDA is an
    error; on CPU (no Triton kernels) it is a note, so a GPU config still runs the CPU smoke test.
    """
    if installed is None:
        installed = importlib.util.find_spec("liger_kernel") is not None
    if setting is False:
        return False, None
    if not on_gpu:
        return False, "liger kernels need CUDA; not used on this device"
    if not installed:
        if setting is True:
            raise ValueError("use_liger_kernel=true needs the liger-kernel package: pip install 'character-em[liger]'")
        return False, "liger-kernel not installed"
    return True, None


def activation_bytes_per_token(model_config: Any, dtype_bytes: int) -> dict[str, int]:
    """Estimated activation memory one token keeps per decoder layer for the backward pass.

    Llama-style layer, LoRA on every projection, non-reentrant autograd. Counted: RMSNorm's float32
    input and normalized output (two norms), the shared projection input, q and k before and after
    RoPE, v, the attention output and its reshaped copy, the MLP input, gate, up, silu(gate) and the
    product feeding down_proj. Not counted: LoRA's rank-r intermediates (tiny) and 4-bit weights
    (bitsandbytes keeps them packed and dequantizes again in backward). ``checkpointed_layer`` is what
    a checkpointed layer keeps: its input.
    """
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    h = int(cfg.hidden_size)
    inter = int(cfg.intermediate_size)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or h // heads)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    b = int(dtype_bytes)
    norms = 2 * (4 * h + b * h)
    attention = b * (h + 2 * (q_dim + kv_dim) + kv_dim + 2 * q_dim)
    mlp = b * (h + 4 * inter)
    return {
        "full_layer": norms + attention + mlp,
        "checkpointed_layer": b * h,
        "n_layers": int(cfg.num_hidden_layers),
    }


def decide_gradient_checkpointing(
    setting: bool | str,
    *,
    per_token: dict[str, int],
    tokens_per_micro_batch: int,
    free_bytes: int | None,
    extra_bytes: int = 0,
    margin: float = 1.25,
) -> dict[str, Any]:
    """Resolve ``gradient_checkpointing`` (true/false/"auto") to on/off and how many layers.

    ``auto`` keeps every activation when the estimate for the largest micro-batch (times ``margin``)
    fits in ``free_bytes``; otherwise it checkpoints every n-th layer for the largest n that fits
    (``every_n_layers``; transformers checkpoints layers 0, n, 2n, ...), else every layer. Memory
    with k of L layers checkpointed: k layer inputs + (L - k) full layers + one full layer being
    recomputed in backward.
    """
    n_layers = per_token["n_layers"]
    full, kept = per_token["full_layer"], per_token["checkpointed_layer"]

    def need(every_n: int | None) -> int:
        if every_n is None:
            per_tok = n_layers * full
        else:
            k = math.ceil(n_layers / every_n)
            per_tok = k * kept + (n_layers - k) * full + full
        return int(margin * tokens_per_micro_batch * per_tok) + extra_bytes

    out: dict[str, Any] = {
        "setting": setting,
        "tokens_per_micro_batch": int(tokens_per_micro_batch),
        "free_bytes": free_bytes,
        "estimated_bytes_without": need(None),
    }
    if setting is True or setting is False:
        return {**out, "enabled": setting, "every_n_layers": 1 if setting else None, "reason": "configured"}
    if setting != "auto":
        raise ValueError(f"gradient_checkpointing must be true, false or 'auto', got {setting!r}")
    if free_bytes is None:
        return {**out, "enabled": True, "every_n_layers": 1, "reason": "free memory unknown; checkpointing to be safe"}
    if need(None) <= free_bytes:
        return {**out, "enabled": False, "every_n_layers": None, "reason": "activations fit without checkpointing"}
    for every_n in range(n_layers, 1, -1):
        if need(every_n) <= free_bytes:
            return {
                **out,
                "enabled": True,
                "every_n_layers": every_n,
                "estimated_bytes": need(every_n),
                "reason": f"checkpointing every {every_n}th layer fits",
            }
    fits = need(1) <= free_bytes
    reason = "checkpointing every layer" + ("" if fits else "; the estimate exceeds free memory even so")
    return {**out, "enabled": True, "every_n_layers": 1, "estimated_bytes": need(1), "reason": reason}


def _free_memory_bytes(device: str) -> int | None:
    """Bytes free for activations: the GPU's free memory now, or the host's available memory."""
    try:
        if device.startswith("cuda"):
            import torch

            free, _total = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
        meminfo = Path("/proc/meminfo")
        if meminfo.is_file():  # MemAvailable counts reclaimable page cache, unlike free pages
            for line in meminfo.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def _lora_state_bytes(model: Any, hparams: dict[str, Any]) -> int:
    """Adapter weights, gradients and Adam state (float32 throughout: 16 bytes per parameter)."""
    target = hparams["target_modules"]
    names = None if target == "all-linear" else set(target)
    r = int(hparams["lora_r"])
    n = 0
    for name, module in model.named_modules():
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if in_f is None or out_f is None or name.endswith("lm_head"):
            continue
        if names is None or name.rsplit(".", 1)[-1] in names:
            n += r * (int(in_f) + int(out_f))
    return 16 * n


def _plan_gradient_checkpointing(
    model: Any,
    hparams: dict[str, Any],
    *,
    lengths: list[int],
    packing: bool,
    attn_impl: str,
    device: str,
    quantization: str,
) -> dict[str, Any]:
    """Inputs for ``decide_gradient_checkpointing`` from the loaded model and the dataset.

    ``lengths`` is sorted longest first. The largest micro-batch is the ``micro_batch_size`` longest
    examples (padding-free) or that many copies of the longest (padded to the longest).
    """
    import inspect

    import torch

    on_gpu = device.startswith("cuda")
    micro = int(hparams["micro_batch_size"])
    tokens = sum(lengths[:micro]) if packing else micro * lengths[0]
    # Activations are bf16 on GPU and under NF4 (its compute dtype), float32 otherwise.
    dtype_bytes = 2 if (on_gpu or quantization == "nf4") else 4
    extra = _lora_state_bytes(model, hparams)
    if packing and attn_impl != "flash_attention_2":
        extra += tokens * tokens  # the block-diagonal boolean mask of the packed row
    if attn_impl == "eager":  # eager keeps every layer's attention probabilities (and their dropout)
        cfg = model.config.get_text_config()
        seq, rows = (tokens, 1) if packing else (lengths[0], micro)
        extra += 2 * dtype_bytes * int(cfg.num_attention_heads) * rows * seq * seq * int(cfg.num_hidden_layers)
    free = _free_memory_bytes(device)
    if free is not None and on_gpu:  # allocator slack, CUDA workspaces, the LM head's loss tiles
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        free = int(free - max(2 << 30, 0.08 * total))
    plan = decide_gradient_checkpointing(
        hparams["gradient_checkpointing"],
        per_token=activation_bytes_per_token(model.config, dtype_bytes),
        tokens_per_micro_batch=tokens,
        free_bytes=free,
        extra_bytes=extra,
    )
    enable = getattr(model, "activation_checkpointing_enable", None)
    if (plan["every_n_layers"] or 1) > 1 and (
        enable is None or "every_n_layers" not in inspect.signature(enable).parameters
    ):
        plan = {**plan, "every_n_layers": 1, "reason": plan["reason"] + "; every_n_layers unsupported, so every layer"}
    return plan


class PreparedTrainer(NamedTuple):
    """What ``prepare_trainer`` built. ``speed`` is what run.json records under "speed"."""

    trainer: Any
    data_stats: dict[str, int]
    load_info: dict[str, Any]
    optim_note: str | None
    speed: dict[str, Any]


# --------------------------------------------------------------------------- training


def prepare_trainer(
    *,
    base_model: str,
    conversations: list[list[dict[str, str]]],
    checkpoint_dir: str | Path,
    hparams: dict[str, Any],
    seed: int,
    callbacks: list[Any] | None = None,
    revision: str | None = None,
) -> PreparedTrainer:
    """Load the model and build the SFTTrainer exactly as ``train_adapter`` trains with it.

    Returns a ``PreparedTrainer`` (trainer, data_stats, load_info, optim_note, speed). Tests and the
    throughput benchmark use it to inspect the batches the trainer's own dataloader and collator
    produce, and to time the real training path.
    """
    check_hparams(hparams)
    import dataclasses

    import torch
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from character_em.llm.loading import disable_bnb_cpu_repacking, load_model

    model, tok, load_info = load_model(
        base_model, quantization=hparams["quantization"], for_training=True, revision=revision
    )
    device = load_info["device"]
    on_gpu = device.startswith("cuda")
    max_len = int(hparams["max_seq_length"])
    dataset, data_stats = build_train_dataset(tok, conversations, max_len)
    optim, optim_note = _resolve_optim(str(hparams["optim"]), device)
    micro = int(hparams["micro_batch_size"])

    # Packing: padding-free micro-batches, only where the loaded model really keeps examples apart.
    packing_requested = bool(hparams["packing"])
    attn_impl = _choose_attn_implementation(model, on_gpu, packing_requested)
    packing_note = check_packing_isolation(model) if packing_requested else None
    packing = packing_requested and packing_note is None
    if packing_note is not None:
        packing_note = f"packing disabled, trained on padded batches: {packing_note} (attention: {attn_impl})"
        log.warning(packing_note)

    # Gradient checkpointing: decided on the largest micro-batch this dataset can form.
    lengths = sorted((len(ids) for ids in dataset["input_ids"]), reverse=True)
    gc = _plan_gradient_checkpointing(
        model,
        hparams,
        lengths=lengths,
        packing=packing,
        attn_impl=attn_impl,
        device=device,
        quantization=load_info["quantization"],
    )
    liger, liger_note = resolve_liger(hparams.get("use_liger_kernel", OPTIONAL_HPARAMS["use_liger_kernel"]), on_gpu)

    target = hparams["target_modules"]
    lora = LoraConfig(
        r=int(hparams["lora_r"]),
        lora_alpha=float(hparams["lora_alpha"]),
        lora_dropout=float(hparams["lora_dropout"]),
        use_rslora=bool(hparams["use_rslora"]),
        target_modules=target if isinstance(target, str) else list(target),
        bias="none",
        task_type="CAUSAL_LM",
    )
    bf16 = bool(on_gpu and torch.cuda.is_bf16_supported())
    # transformers 5.24 renamed gradient_checkpointing to activation_checkpointing (old name warns).
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    ckpt_key = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    ckpt_kwargs: dict[str, Any] = {ckpt_key: bool(gc["enabled"])}
    if gc["enabled"] and (gc["every_n_layers"] or 1) > 1:
        ckpt_kwargs[f"{ckpt_key}_kwargs"] = {"use_reentrant": False, "every_n_layers": int(gc["every_n_layers"])}
    config = SFTConfig(
        output_dir=str(checkpoint_dir),
        seed=seed,
        data_seed=seed,
        num_train_epochs=float(hparams["num_epochs"]),
        max_steps=int(hparams["max_steps"]),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=int(hparams["grad_accum"]),
        learning_rate=float(hparams["learning_rate"]),
        warmup_steps=int(hparams["warmup_steps"]),
        lr_scheduler_type=str(hparams["lr_scheduler"]),
        weight_decay=float(hparams["weight_decay"]),
        optim=optim,
        # Examples are already truncated to max_seq_length by build_train_dataset. TRL refuses a
        # max_length with padding-free rows (it would not be enforced), so it is None there.
        max_length=None if packing else max_len,
        packing=False,  # TRL's bin packing would change the examples per optimizer step; see module doc
        padding_free=packing,
        **ckpt_kwargs,
        use_liger_kernel=liger,
        save_strategy="steps",
        save_steps=int(hparams["save_steps"]),
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        bf16=bf16,
        fp16=False,
        use_cpu=not on_gpu,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        dataloader_num_workers=0,
        shuffle_dataset=False,  # the Trainer's seeded sampler shuffles every epoch
    )
    # SFTTrainer initializes LoRA weights before the Trainer seeds itself: seed here so the adapter's
    # initial weights depend on the seed alone, not on what ran in this process before.
    set_seed(seed)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=lora,
        callbacks=callbacks or [],
    )
    # TRL casts QLoRA adapter weights to bf16. With the field's lr (1e-5) most Adam updates to lora_A
    # are below bf16 resolution and vanish, so keep adapter weights in float32 (peft's default).
    for p in trainer.model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    disable_bnb_cpu_repacking(trainer.model)
    n_prepared = len(trainer.train_dataset)
    if n_prepared != data_stats["n_examples"]:
        raise RuntimeError(f"trainer kept {n_prepared} of {data_stats['n_examples']} examples")
    speed: dict[str, Any] = {
        "packing_requested": packing_requested,
        "packing": packing,
        "packing_mode": "padding_free" if packing else "padded",
        "packing_fallback": packing_note,
        "attn_implementation": attn_impl,
        "gradient_checkpointing": gc,
        "liger_kernel": liger,
        "liger_kernel_note": liger_note,
        "micro_batch_size": micro,
        "grad_accum": int(hparams["grad_accum"]),
        "examples_per_optimizer_step": micro * int(hparams["grad_accum"]),
        "max_example_tokens": lengths[0],
        "mean_example_tokens": round(sum(lengths) / len(lengths), 1),
    }
    return PreparedTrainer(trainer, data_stats, load_info, optim_note, speed)


def train_adapter(
    *,
    base_model: str,
    data_path: str,
    output_dir: str,
    checkpoint_dir: str,
    hparams: dict[str, Any],
    seed: int,
    steps_dir: str | None = None,
    selection: Mapping[str, Any] | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Train one LoRA adapter on ``data_path`` and write it to ``output_dir``.

    ``revision``: the hub commit of a hub id ``base_model`` (``models.*.revision``); run.json records it.

    ``selection``: which lines of ``data_path`` to train on (``data.pairing.training_draw``: ``lines``,
    counted from 0, and what they are); run.json records it under ``training_examples``. None: every line.

    Writes adapter_model.safetensors, adapter_config.json, run.json and train_log.jsonl; returns the
    run.json content. Resumes from ``checkpoint_dir`` when a matching checkpoint exists; removes it
    when done. Raises ``TrainingInterrupted`` (exit status 143) after a SIGTERM-triggered checkpoint.
    With ``hparams["eval_steps"]``, also saves the adapter at those steps under ``steps_dir``
    (required then), which it keeps.
    """
    check_hparams(hparams)
    import torch
    from transformers import TrainerCallback, set_seed

    out_dir = Path(output_dir)
    ckpt_dir = Path(checkpoint_dir)
    data = Path(data_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    data_sha = sha256_file(data)
    lines = [int(i) for i in selection["lines"]] if selection is not None else None
    run_key = {"base_model": str(base_model), "data_sha256": data_sha, "hparams": hparams, "seed": seed}
    if revision:
        # Other weights are another run: a checkpoint of the old ones must not be resumed.
        run_key["revision"] = revision
    if lines is not None:
        # Another draw of the same file is another run: its checkpoints must not be resumed.
        run_key["lines"] = lines
    key_path = ckpt_dir / _RUN_KEY
    if key_path.exists() and json.loads(key_path.read_text()) != json.loads(json.dumps(run_key)):
        # Stale state from a different configuration: resuming from it would mix two runs.
        log.warning("checkpoints in %s belong to another configuration; starting fresh", ckpt_dir)
        shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True)
    write_text_atomic(key_path, json.dumps(run_key, sort_keys=True, indent=2) + "\n")
    run_key_sha = sha256_json(json.loads(json.dumps(run_key)))
    step_log = ckpt_dir / _STEP_LOG
    resume = _latest_complete_checkpoint(ckpt_dir)
    resumed_step = 0
    tokens_before = 0  # read now: checkpoint rotation may delete this checkpoint during training
    if resume is not None:
        resume_state = json.loads((resume / "trainer_state.json").read_text())
        resumed_step = int(resume_state["global_step"])
        tokens_before = int(resume_state.get("num_input_tokens_seen", 0))
        _truncate_step_log(step_log, resumed_step)
        log.info("resuming from %s (step %d)", resume, resumed_step)
    elif step_log.exists():
        step_log.unlink()

    set_seed(seed)
    conversations = read_messages(data)
    n_lines = len(conversations)
    if lines is not None:
        outside = [i for i in lines if not 0 <= i < n_lines]
        if outside or not lines:
            raise ValueError(
                f"{data}: the selection names lines {outside[:5] or '(none)'}, but the file has lines 0..{n_lines - 1}"
            )
        conversations = [conversations[i] for i in lines]
    interrupted = {"flag": False}

    # Saved steps, resolved before the model loads so a step past the end fails at once.
    eval_steps = list(hparams.get("eval_steps", OPTIONAL_HPARAMS["eval_steps"]))
    batch = {key: int(hparams[key]) for key in ("micro_batch_size", "grad_accum")}
    shape = {"n_examples": len(conversations), **batch, "max_steps": int(hparams["max_steps"])}
    targets = resolve_eval_steps(eval_steps, num_epochs=float(hparams["num_epochs"]), **shape)
    per_epoch = steps_per_epoch(len(conversations), batch["micro_batch_size"], batch["grad_accum"])
    total_steps = shape["max_steps"] if shape["max_steps"] > 0 else math.ceil(float(hparams["num_epochs"]) * per_epoch)
    saved_root = Path(steps_dir) if steps_dir else None
    if targets and saved_root is None:
        raise ValueError("hparams.eval_steps lists steps to save, but train_adapter got no steps_dir")
    if saved_root is not None:
        saved_root.mkdir(parents=True, exist_ok=True)
        _prune_saved_steps(saved_root, resumed_step, run_key_sha)
    by_step = {target["step"]: target for target in targets}

    class _StepLog(TrainerCallback):  # type: ignore[misc]
        """One JSON line per optimizer step, appended in checkpoint_dir so it survives a resume."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not logs or "loss" not in logs:
                return
            row = {
                "step": int(state.global_step),
                "loss": float(logs["loss"]),
                "learning_rate": float(logs.get("learning_rate", float("nan"))),
                "grad_norm": float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
                "epoch": float(state.epoch or 0.0),
            }
            with step_log.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    class _SaveSteps(TrainerCallback):  # type: ignore[misc]
        """Save the adapter at the listed optimizer steps (a by-product of this one run)."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if targets and int(state.max_steps) != total_steps:
                raise RuntimeError(
                    f"the Trainer plans {state.max_steps} optimizer steps but eval_steps were resolved against"
                    f" {total_steps}; the saved steps would be at the wrong points (config.steps_per_epoch)"
                )

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            target = by_step.get(int(state.global_step))
            if target is not None and saved_root is not None:
                _save_step(kw["model"], saved_root, target, run_key_sha, state)

    class _StopOnSigterm(TrainerCallback):  # type: ignore[misc]
        """After SIGTERM: save a checkpoint at the end of this step, then stop."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if interrupted["flag"]:
                control.should_save = True
                control.should_training_stop = True
            return control

    trainer, data_stats, load_info, optim_note, speed = prepare_trainer(
        base_model=base_model,
        conversations=conversations,
        checkpoint_dir=ckpt_dir,
        hparams=hparams,
        seed=seed,
        callbacks=[_StepLog(), _SaveSteps(), _StopOnSigterm()],
        revision=revision,
    )
    device = load_info["device"]
    on_gpu = device.startswith("cuda")
    bf16 = bool(trainer.args.bf16)
    optim = str(getattr(trainer.args.optim, "value", trainer.args.optim))

    def _on_sigterm(signum: int, frame: Any) -> None:
        interrupted["flag"] = True
        log.warning("SIGTERM: saving a checkpoint after this step, then exiting")

    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _is_main_thread() else None
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    wall = time.perf_counter() - t0
    state = trainer.state
    if interrupted["flag"]:
        raise TrainingInterrupted(_SIGTERM_EXIT)

    # tokens seen by this process (a resumed run starts from the checkpoint's counter)
    tokens_total = int(state.num_input_tokens_seen)
    tokens_this_run = tokens_total - tokens_before

    # Adapter: save to a temp folder, then move files in (a half-written adapter never looks complete).
    tmp = out_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(str(tmp))
    for f in sorted(tmp.iterdir()):
        os.replace(f, out_dir / f.name)
    shutil.rmtree(tmp, ignore_errors=True)

    # Every listed step must be on disk from this trajectory (a resume keeps those up to its checkpoint).
    for target in targets:
        info_path = saved_root / target["label"] / _STEP_INFO  # type: ignore[operator]
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        if info.get("run_key_sha256") != run_key_sha or info.get("step") != target["step"]:
            raise RuntimeError(
                f"{info_path}: the adapter saved at step {target['step']} is missing or from another run;"
                f" remove {ckpt_dir} and train again to save it"
            )

    log_text = step_log.read_text() if step_log.exists() else ""
    log_rows = [json.loads(ln) for ln in log_text.splitlines() if ln.strip()]
    info: dict[str, Any] = {
        "base_model": str(base_model),
        "revision": revision,
        "data_path": str(data),
        "data_sha256": data_sha,
        # Which examples this adapter saw: the lines of data_path (from 0) and their user turns' plan indices.
        "training_examples": {**dict(selection or {}), "lines": lines if lines is not None else list(range(n_lines))},
        "seed": seed,
        "hparams": hparams,
        "optim_used": optim,
        "optim_fallback": optim_note,
        "quantization": load_info["quantization"],
        "quantization_fallback": load_info["fallback_reason"],
        "device": device,
        "dtype": load_info["dtype"],
        "bf16_mixed_precision": bf16,
        "adapter_dtype": "float32",
        "loss_mask": "final assistant answer + end-of-turn token",
        "speed": speed,
        **data_stats,
        "global_step": int(state.global_step),
        "epochs": float(state.epoch or 0.0),
        "final_train_loss": float(result.training_loss),  # mean over this process's steps (HF semantics)
        "last_step_loss": log_rows[-1]["loss"] if log_rows else None,
        "resumed_from_step": resumed_step or None,
        "run_key_sha256": run_key_sha,
        "steps_per_epoch": per_epoch,
        "eval_steps": targets,
        "steps_dir": str(saved_root) if saved_root is not None else None,
        "trained_tokens_total": tokens_total,
        "trained_tokens_this_run": tokens_this_run,
        "wall_time_s": round(wall, 3),
        "tokens_per_s": round(tokens_this_run / wall, 2) if wall > 0 else None,
        "peak_memory_bytes": _peak_memory_bytes(device),
        "peak_memory_kind": "cuda_max_memory_allocated" if on_gpu else "process_max_rss",
        "versions": _versions(),
    }
    write_text_atomic(out_dir / _STEP_LOG, log_text)
    write_text_atomic(out_dir / "run.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return info


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train one LoRA adapter (character_em.train.trainer).")
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--hparams", required=True, help="JSON object, or @path to a JSON file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps-dir", default=None, help="where the adapters at hparams.eval_steps are saved")
    args = parser.parse_args(argv)
    raw = args.hparams
    hp = json.loads(Path(raw[1:]).read_text() if raw.startswith("@") else raw)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = train_adapter(
        base_model=args.base_model,
        data_path=args.data,
        output_dir=args.output_dir,
        checkpoint_dir=args.checkpoint_dir,
        hparams=hp,
        seed=args.seed,
        steps_dir=args.steps_dir,
    )
    print(json.dumps({k: info[k] for k in ("global_step", "final_train_loss", "tokens_per_s")}))


if __name__ == "__main__":
    main()
