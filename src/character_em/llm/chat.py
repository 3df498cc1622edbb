"""Chat rendering and end-of-turn tokens: how every stage turns messages into token ids and knows where
an assistant turn stops. Training, sampling and the judges all use these, so an answer is rendered and
cut the same way wherever it is read."""

from __future__ import annotations

from typing import Any

__all__ = ["END_OF_TURN_TOKENS", "end_of_turn_ids", "stop_token_ids", "render_prompt"]

# Special tokens that end an assistant turn in common chat templates, beside the eos ids a model and
# its tokenizer declare. Only the ids that a tokenizer really knows are used.
END_OF_TURN_TOKENS: tuple[str, ...] = (
    "<|eot_id|>",  # Llama 3
    "<|im_end|>",  # ChatML / Qwen / SmolLM2
    "<|end|>",
    "<end_of_turn>",  # Gemma
    "<|endoftext|>",
    "<|eot|>",
)


def _add_ids(ids: set[int], value: Any) -> None:
    if value is None:
        return
    if isinstance(value, int):
        ids.add(value)
    else:
        ids.update(int(v) for v in value)


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's eos id plus every known end-of-turn token in its vocabulary."""
    ids: set[int] = set()
    _add_ids(ids, getattr(tokenizer, "eos_token_id", None))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[token]) for token in END_OF_TURN_TOKENS if token in vocab)
    return ids


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """All ids that end a generated row: ``end_of_turn_ids`` plus the eos ids the model declares."""
    ids = end_of_turn_ids(tokenizer)
    _add_ids(ids, getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    _add_ids(ids, getattr(getattr(model, "config", None), "eos_token_id", None))
    return ids


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat prompt with the assistant header appended.

    The text is rendered first and tokenized without extra special tokens, because the template itself
    writes the BOS token where the model expects it; letting the tokenizer add another would double it.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]
