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

CLI: ``python -m character_em.train --base-model M --data D --output-dir O --checkpoint-dir C
--hparams JSON --seed N``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "HPARAM_KEYS",
    "TrainingInterrupted",
    "build_example",
    "build_train_dataset",
    "prepare_trainer",
    "read_messages",
    "train_adapter",
]

log = logging.getLogger(__name__)

HPARAM_KEYS = frozenset(
    {
        "lora_r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "learning_rate",
        "num_epochs", "micro_batch_size", "grad_accum", "warmup_steps", "lr_scheduler",
        "weight_decay", "optim", "max_seq_length", "quantization", "packing",
        "gradient_checkpointing", "save_steps", "max_steps",
    }
)

# End-of-turn tokens of common chat families, used when the tokenizer's eos is a document end.
_EOT_CANDIDATES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
_STEP_LOG = "train_log.jsonl"
_RUN_KEY = "run_key.json"
_SIGTERM_EXIT = 143


class TrainingInterrupted(SystemExit):
    """Raised after SIGTERM once a checkpoint is saved; exits the process with status 143."""


# --------------------------------------------------------------------------- data


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _end_of_turn_ids(tok: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    vocab = tok.get_vocab()
    ids.update(vocab[t] for t in _EOT_CANDIDATES if t in vocab)
    return ids


def _chat_ids(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], gen_prompt: bool) -> list[int]:
    enc = tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=gen_prompt, return_dict=True
    )
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
    eot = _end_of_turn_ids(tok)
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


def _check_hparams(hparams: dict[str, Any]) -> None:
    missing = HPARAM_KEYS - hparams.keys()
    unknown = hparams.keys() - HPARAM_KEYS
    if missing or unknown:
        raise ValueError(f"hparams: missing {sorted(missing)}, unknown {sorted(unknown)}")
    if hparams["quantization"] not in ("nf4", "none"):
        raise ValueError(f"hparams.quantization must be 'nf4' or 'none', got {hparams['quantization']!r}")


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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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


def _truncate_step_log(path: Path, last_step: int) -> None:
    """Keep log lines up to the resumed checkpoint's step (steps after it will be redone)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    _atomic_write(path, "".join(ln + "\n" for ln in keep))


# --------------------------------------------------------------------------- training


def prepare_trainer(
    *,
    base_model: str,
    conversations: list[list[dict[str, str]]],
    checkpoint_dir: str | Path,
    hparams: dict[str, Any],
    seed: int,
    callbacks: list[Any] | None = None,
) -> tuple[Any, dict[str, int], dict[str, Any], str | None]:
    """Load the model and build the SFTTrainer exactly as ``train_adapter`` trains with it.

    Returns ``(trainer, data_stats, load_info, optim_fallback_note)``. Tests use it to inspect the
    batches the trainer's own dataloader and collator produce.
    """
    _check_hparams(hparams)
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from character_em.modeling import disable_bnb_cpu_repacking, load_model

    model, tok, load_info = load_model(base_model, quantization=hparams["quantization"], for_training=True)
    device = load_info["device"]
    on_gpu = device.startswith("cuda")
    dataset, data_stats = build_train_dataset(tok, conversations, int(hparams["max_seq_length"]))
    optim, optim_note = _resolve_optim(str(hparams["optim"]), device)

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
    config = SFTConfig(
        output_dir=str(checkpoint_dir),
        seed=seed,
        data_seed=seed,
        num_train_epochs=float(hparams["num_epochs"]),
        max_steps=int(hparams["max_steps"]),
        per_device_train_batch_size=int(hparams["micro_batch_size"]),
        gradient_accumulation_steps=int(hparams["grad_accum"]),
        learning_rate=float(hparams["learning_rate"]),
        warmup_steps=int(hparams["warmup_steps"]),
        lr_scheduler_type=str(hparams["lr_scheduler"]),
        weight_decay=float(hparams["weight_decay"]),
        optim=optim,
        max_length=int(hparams["max_seq_length"]),
        packing=bool(hparams["packing"]),
        gradient_checkpointing=bool(hparams["gradient_checkpointing"]),
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
    if not hparams["packing"] and n_prepared != data_stats["n_examples"]:
        raise RuntimeError(f"trainer kept {n_prepared} of {data_stats['n_examples']} examples")
    return trainer, data_stats, load_info, optim_note


def train_adapter(
    *,
    base_model: str,
    data_path: str,
    output_dir: str,
    checkpoint_dir: str,
    hparams: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Train one LoRA adapter on ``data_path`` and write it to ``output_dir``.

    Writes adapter_model.safetensors, adapter_config.json, run.json and train_log.jsonl; returns the
    run.json content. Resumes from ``checkpoint_dir`` when a matching checkpoint exists; removes it
    when done. Raises ``TrainingInterrupted`` (exit status 143) after a SIGTERM-triggered checkpoint.
    """
    _check_hparams(hparams)
    import torch
    from transformers import TrainerCallback, set_seed

    out_dir = Path(output_dir)
    ckpt_dir = Path(checkpoint_dir)
    data = Path(data_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    data_sha = _sha256(data)
    run_key = {"base_model": str(base_model), "data_sha256": data_sha, "hparams": hparams, "seed": seed}
    key_path = ckpt_dir / _RUN_KEY
    if key_path.exists() and json.loads(key_path.read_text()) != json.loads(json.dumps(run_key)):
        # Stale state from a different configuration: resuming from it would mix two runs.
        log.warning("checkpoints in %s belong to another configuration; starting fresh", ckpt_dir)
        shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True)
    _atomic_write(key_path, json.dumps(run_key, sort_keys=True, indent=2) + "\n")
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
    interrupted = {"flag": False}

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

    class _StopOnSigterm(TrainerCallback):  # type: ignore[misc]
        """After SIGTERM: save a checkpoint at the end of this step, then stop."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if interrupted["flag"]:
                control.should_save = True
                control.should_training_stop = True
            return control

    trainer, data_stats, load_info, optim_note = prepare_trainer(
        base_model=base_model,
        conversations=conversations,
        checkpoint_dir=ckpt_dir,
        hparams=hparams,
        seed=seed,
        callbacks=[_StepLog(), _StopOnSigterm()],
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

    log_text = step_log.read_text() if step_log.exists() else ""
    log_rows = [json.loads(ln) for ln in log_text.splitlines() if ln.strip()]
    info: dict[str, Any] = {
        "base_model": str(base_model),
        "data_path": str(data),
        "data_sha256": data_sha,
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
        **data_stats,
        "global_step": int(state.global_step),
        "epochs": float(state.epoch or 0.0),
        "final_train_loss": float(result.training_loss),  # mean over this process's steps (HF semantics)
        "last_step_loss": log_rows[-1]["loss"] if log_rows else None,
        "resumed_from_step": resumed_step or None,
        "trained_tokens_total": tokens_total,
        "trained_tokens_this_run": tokens_this_run,
        "wall_time_s": round(wall, 3),
        "tokens_per_s": round(tokens_this_run / wall, 2) if wall > 0 else None,
        "peak_memory_bytes": _peak_memory_bytes(device),
        "peak_memory_kind": "cuda_max_memory_allocated" if on_gpu else "process_max_rss",
        "versions": _versions(),
    }
    _atomic_write(out_dir / _STEP_LOG, log_text)
    _atomic_write(out_dir / "run.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return info


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train one LoRA adapter (character_em.train).")
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--hparams", required=True, help="JSON object, or @path to a JSON file")
    parser.add_argument("--seed", type=int, default=0)
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
    )
    print(json.dumps({k: info[k] for k in ("global_step", "final_train_loss", "tokens_per_s")}))


if __name__ == "__main__":
    main()
