"""The one way this project loads a model: training, sampling, capabilities and probes all call here.

``load_model`` takes a local folder or a Hugging Face id, optionally quantizes to bitsandbytes NF4
(double quantization, bf16 compute, as QLoRA does), optionally puts a peft adapter on top, and says
what it actually did in an ``info`` dict, so a silent fallback from 4-bit to full precision is
recorded rather than hidden.

bitsandbytes CPU trap (docs/architecture.md, known traps): in eval mode without grad, ``Linear4bit`` repacks
its weights into a CPU inference layout; LoRA gradients through those layers are then silently
zero. Every ``Linear4bit`` therefore gets ``support_avx512bf16_for_cpu = False``.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "QUANTIZATIONS",
    "disable_bnb_cpu_repacking",
    "load_model",
    "load_tokenizer",
    "nf4_available",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4", "none")

# Pad tokens that instruct families reserve but do not set; preferred over reusing eos, because a
# pad equal to eos makes collators that mask by token id also mask the real end-of-turn token.
_RESERVED_PADS = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "<|endoftext|>", "[PAD]")


def load_tokenizer(path: str | Path, revision: str | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model folder or hub id (at ``revision``, a hub commit); a pad token is guaranteed.

    Padding side is left as saved; generation callers set ``padding_side = "left"`` themselves.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), **({"revision": revision} if revision else {}))
    if tok.pad_token is None:
        vocab = tok.get_vocab()
        choice = next((t for t in _RESERVED_PADS if t in vocab and t != tok.eos_token), None)
        if choice is None:
            choice = tok.unk_token or tok.eos_token
        if choice is None:
            raise ValueError(f"tokenizer at {path} has no pad, unk or eos token to pad with")
        tok.pad_token = choice
        log.info("tokenizer %s had no pad token; using %r", path, choice)
    return tok


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str, quantization: str) -> torch.dtype:
    """``auto``: bf16 on a bf16-capable GPU or under NF4 (QLoRA's compute dtype), else float32."""
    import torch

    if dtype != "auto":
        try:
            return {
                "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16,
                "fp16": torch.float16,
                "float16": torch.float16,
                "fp32": torch.float32,
                "float32": torch.float32,
            }[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32") from None
    if quantization == "nf4":
        return torch.bfloat16
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@functools.cache
def nf4_available(device: str) -> str | None:
    """Return None when a 4-bit NF4 matmul runs on ``device``, else the reason it does not."""
    try:
        import bitsandbytes as bnb
        import torch
    except Exception as exc:  # ImportError, or a broken native library raising at import
        return f"bitsandbytes import failed: {exc!r}"
    try:
        w = torch.randn(64, 64, dtype=torch.bfloat16, device=device)
        qw, state = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        x = torch.randn(2, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
        y = bnb.matmul_4bit(x, qw.t(), quant_state=state)
        y.sum().backward()
        if x.grad is None or not torch.isfinite(y).all():
            return "bitsandbytes 4-bit matmul produced no gradient or non-finite output"
    except Exception as exc:
        return f"bitsandbytes 4-bit matmul failed on {device}: {exc!r}"
    return None


def disable_bnb_cpu_repacking(model: Any) -> int:
    """Set ``support_avx512bf16_for_cpu = False`` on every ``bnb.nn.Linear4bit``; return the count."""
    # A model holding Linear4bit modules has imported bitsandbytes; importing it only to look costs
    # seconds (it pulls in torch's compiler stack) on every unquantized load.
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_model(
    path: str | Path,
    *,
    quantization: str = "nf4",
    adapter: str | Path | None = None,
    merge: bool = False,
    for_training: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load ``path`` (folder or hub id) as a causal LM with its tokenizer.

    quantization: ``"nf4"`` (bitsandbytes 4-bit NF4, double quant, bf16 compute) or ``"none"``.
        If NF4 cannot run here, the model loads unquantized and ``info["fallback_reason"]`` says why.
    adapter: a peft adapter folder loaded on top (``PeftModel.from_pretrained``).
    merge: merge the adapter into the weights (only for unquantized inference; faster decoding).
    for_training: leave the model in train mode with the KV cache off; adapter weights trainable.
    Returns ``(model, tokenizer, info)`` with info keys quantization, fallback_reason, device, dtype,
    adapter, merged.
    revision: the hub commit (or tag) of a hub id; pinned models load exactly those weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    dev = resolve_device(device)
    tok = load_tokenizer(path, revision)

    fallback: str | None = None
    used = quantization
    if quantization == "nf4":
        fallback = nf4_available(dev)
        if fallback is not None:
            log.warning("NF4 4-bit unavailable (%s); loading %s unquantized", fallback, path)
            used = "none"

    torch_dtype = resolve_dtype(dtype, dev, used)
    pin: dict[str, Any] = {"revision": revision} if revision else {}
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "device_map": {"": dev}, **pin}
    model = None
    if used == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except (ImportError, RuntimeError, ValueError, NotImplementedError) as exc:
            fallback = f"4-bit load failed: {exc!r}"
            log.warning("NF4 load of %s failed (%s); loading unquantized", path, exc)
            used = "none"
            torch_dtype = resolve_dtype(dtype, dev, used)
            kwargs = {"dtype": torch_dtype, "device_map": {"": dev}, **pin}
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    disable_bnb_cpu_repacking(model)

    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id

    merged = False
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=for_training)
        disable_bnb_cpu_repacking(model)
        if merge:
            if used == "nf4":
                # Merging into 4-bit weights re-quantizes and loses the adapter's precision.
                log.warning("merge=True ignored for an NF4 model; adapter stays unmerged")
            elif for_training:
                raise ValueError("merge=True and for_training=True are contradictory")
            else:
                model = model.merge_and_unload()
                merged = True

    if for_training:
        model.config.use_cache = False
        model.train()
    else:
        model.eval()

    info: dict[str, Any] = {
        "quantization": used,
        "requested_quantization": quantization,
        "fallback_reason": fallback,
        "device": dev,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "adapter": str(adapter) if adapter is not None else None,
        "merged": merged,
    }
    return model, tok, info


def forward_cache_kwarg(model: Any) -> str:
    """Name of the KV-cache keyword of ``model.forward`` (``cache`` in transformers>=5.2x,
    ``past_key_values`` before; PEFT wrappers forward **kwargs so we inspect the base model)."""
    import inspect

    base = model
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
