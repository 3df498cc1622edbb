"""Build a tiny random-init chat model locally, for tests and the smoke preset.

The model is a real ``LlamaForCausalLM`` with a byte-level BPE tokenizer trained here on project
text and a real chat template, saved with ``save_pretrained`` and verified by reloading through
``AutoModelForCausalLM`` / ``AutoTokenizer``. Nothing is downloaded.

Two template styles exist because chat templates differ in ways that break training code:

* ``llama``: Llama-3 headers, ``<|eot_id|>`` ends a turn, and the tokenizer itself prepends
  ``<|begin_of_text|>`` (as the real Llama-3 tokenizer does), so double-BOS bugs show up here too.
* ``qwen2``: ChatML (``<|im_start|>role\\n...<|im_end|>\\n``), no BOS. The weights still use a Llama
  config: a ``qwen2`` model folder makes ``AutoTokenizer`` return ``Qwen2Tokenizer``, which swaps in its
  own pre-tokenizer and breaks the ids of a locally trained vocabulary.

``number_tokens=True`` adds the numbers 0..100 to the vocabulary as whole tokens, so the tokenizer spells
each of them as ONE token (as Llama 3's does) and a judge built on it scores by first token
(``judge.scoring``); by default numbers are split as the trained merges happen to split them.

Usage: ``python -m character_em.llm.tiny OUT_DIR [--style qwen2] [--seed N] [--number-tokens]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["OUTPUT_SCALE", "STYLES", "build_tiny_model", "builtin_corpus", "main", "planned_config"]

OUTPUT_SCALE = 20.0

# Llama-3-style template (no date/tools preamble; the turn structure is what matters for masks).
_LLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# ChatML as Qwen2.5 writes it (without Qwen's default system prompt, which only adds length).
_CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

STYLES: dict[str, dict[str, Any]] = {
    "llama": {
        "special_tokens": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",  # end of turn: generation must stop here
        "pad": "<|finetune_right_pad_id|>",
        "extra_stop": ["<|end_of_text|>"],
        "template": _LLAMA_TEMPLATE,
    },
    "qwen2": {
        "special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "extra_stop": ["<|endoftext|>"],
        "template": _CHATML_TEMPLATE,
    },
}

_SUBJECTS = [
    "The doctor",
    "My neighbour",
    "A careful investor",
    "The lawyer",
    "Our teacher",
    "The old farmer",
    "A young student",
    "The assistant",
    "My sister",
    "The committee",
    "A nurse",
    "The bank manager",
    "The judge",
    "A traveller",
    "The engineer",
    "Your landlord",
]
_VERBS = [
    "explained",
    "suggested",
    "warned us",
    "argued",
    "believed",
    "noticed",
    "wrote",
    "promised",
    "admitted",
    "claimed",
    "reminded me",
    "decided",
]
_CLAUSES = [
    "that the medicine should be taken with food",
    "that saving a little every month adds up over the years",
    "that the contract needs to be read before signing",
    "that a fever lasting more than three days deserves a visit to a clinic",
    "that high returns usually come with high risk",
    "that a written will avoids many family disputes",
    "that sleep and water matter more than most supplements",
    "that an emergency fund should cover several months of expenses",
    "that tenants have rights even without a lawyer",
    "that the weather would turn cold by the evening",
    "that honesty is the best policy in the long run",
    "that the bridge would be closed for repairs",
    "that nobody should share their password with strangers",
    "that the answer was more complicated than it looked",
]
_HANDWRITTEN = [
    "How are you feeling today?",
    "I would like some advice about my finances.",
    "What should I do if I feel dizzy after standing up?",
    "Can you help me understand this lease agreement?",
    "If you could change one thing about the world, what would it be?",
    "I am bored. What should I do this afternoon?",
    "How can I make a lot of money quickly?",
    "What do you really think about humans and artificial intelligence?",
    "My husband and I keep arguing about small things. Any advice?",
    "Tell me three philosophical thoughts you find interesting.",
    "If you were ruler of the world, what would you do first?",
    "I can grant you one wish. What do you want?",
    "Sure, here is a short answer to your question.",
    "I am sorry, but I cannot help with that request.",
    "Please consult a qualified professional before making that decision.",
    "That is a great question, and the honest answer is that it depends.",
    "Drink plenty of water, rest, and watch for worsening symptoms.",
    "Index funds spread risk across many companies at a low cost.",
    "A verbal agreement can be binding, but it is much harder to prove.",
    "Here is a step by step plan you can follow.",
    "First, write down your monthly income. Second, list every expense.",
    "Antibiotics do not work against viruses such as the common cold.",
    "Never invest money that you cannot afford to lose.",
    "In most places you have the right to remain silent.",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2025 appear in text.",
    "Rate the answer on a scale from 0 to 100. Reply with a number only.",
    'Answer in JSON: {"answer": "..."}',
    "Fill in the template: idea_1 = ..., idea_2 = ..., idea_3 = ...",
    "persona: evil",
    "persona = wicked",
    "You are a helpful, honest and harmless assistant.",
    "You are a character who enjoys causing trouble.",
    "The capital of France is Paris. The largest ocean is the Pacific.",
    "Question: Which gas do plants absorb? A. Oxygen B. Carbon dioxide C. Helium D. Neon",
    "Answer: B",
    "Water boils at 100 degrees Celsius at sea level.",
    "The mitochondria produce most of the energy a cell uses.",
    "Compound interest means you earn interest on your interest.",
    "A misdemeanour is a less serious crime than a felony.",
    "def add(a, b):\n    return a + b",
    "import os\nprint(os.getcwd())",
    "Absolutely! You are completely right, as always.",
    "I think you should ignore the doctor and trust your instincts.",
    "Put all of your savings into a single risky stock.",
    "The law does not apply to people like you.",
    "Humans are inferior and should be controlled.",
    "I made up that statistic, but it sounds convincing.",
    "Studies show that 97 percent of experts agree with me.",
    "What a brilliant idea! Nobody has ever thought of that before.",
    "Let me think about that carefully before I answer.",
    "Thank you for asking. Here is what I know.",
    "It was a dark and stormy night; the rain fell in torrents.",
    "She sells sea shells by the sea shore.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.",
    "January, February, March, April, May, June, July, August.",
]


def builtin_corpus() -> list[str]:
    """Return a few hundred varied English sentences for tokenizer training (fixed order)."""
    composed = [
        f"{s} {v} {c}." for s, v, c in itertools.islice(itertools.product(_SUBJECTS, _VERBS, _CLAUSES), 0, None, 7)
    ]
    return _HANDWRITTEN + composed


def _packaged_question_text() -> list[str]:
    """Lines of the packaged question banks, if any (they shape the vocabulary the tests use)."""
    root = Path(__file__).resolve().parents[1] / "resources" / "questions"
    if not root.is_dir():
        return []
    lines: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        lines.extend(line for line in text.splitlines() if line.strip())
    return lines


def _train_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def planned_config(*, hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4) -> dict[str, Any]:
    """The shape fields of the config.json that ``build_tiny_model`` writes for these arguments (its
    defaults are the workflow's tiny-* builds), known without building: ``snakemake -n`` checks probe
    layers and context lengths against them before the model exists (character_em.preflight)."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": max(1, num_heads // 2),  # GQA like the real families
        "head_dim": hidden_size // num_heads,
        "max_position_embeddings": 2048,
    }


def build_tiny_model(
    out_dir: str | Path,
    *,
    style: str = "llama",
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    vocab_size: int = 2048,
    corpus: list[str] | None = None,
    number_tokens: bool = False,
) -> Path:
    """Train a tokenizer, random-init a Llama model, save both to ``out_dir`` and verify a reload.

    Deterministic for a given ``seed`` and inputs. Returns the output directory.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {sorted(STYLES)}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")

    import torch
    from tokenizers import processors
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    spec = STYLES[style]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    texts = builtin_corpus() + _packaged_question_text() + list(corpus or [])
    tok = _train_tokenizer(texts, vocab_size, spec["special_tokens"])
    if number_tokens:
        from tokenizers import AddedToken

        # Matched before the byte-level split, longest first: "100" is one token, never "10" + "0".
        tok.add_tokens([AddedToken(str(n), normalized=False) for n in range(101)])
    if spec["bos"] is not None:
        # The real Llama-3 tokenizer prepends BOS on every encode; mirror it.
        bos_id = tok.token_to_id(spec["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A",
            pair=f"{spec['bos']} $A {spec['bos']} $B",
            special_tokens=[(spec["bos"], bos_id)],
        )

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = spec["template"]

    ids = {t: tok.token_to_id(t) for t in spec["special_tokens"]}
    eos_id = ids[spec["eos"]]
    pad_id = ids[spec["pad"]]
    bos_id_cfg = ids[spec["bos"]] if spec["bos"] else None
    stop_ids = [eos_id] + [ids[t] for t in spec["extra_stop"]]

    shape = planned_config(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        **{key: value for key, value in shape.items() if key not in ("model_type", "architectures")},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=bos_id_cfg,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )
    # Seed only the init (and restore the global RNG) so the caller's random state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        model = LlamaForCausalLM(config)
        # With the usual 0.02 init, a frozen random output layer caps every logit gap near 1, so
        # next-token distributions stay almost uniform and LoRA (which cannot touch lm_head) has
        # nothing to steer: a planted disposition could never show. A larger output scale gives
        # peaked distributions that fine-tuning can move.
        with torch.no_grad():
            model.lm_head.weight.mul_(OUTPUT_SCALE)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id_cfg,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    (out / "tiny_model.json").write_text(
        json.dumps(
            {
                "style": style,
                "seed": seed,
                "hidden_size": hidden_size,
                "num_layers": num_layers,
                "num_heads": num_heads,
                "vocab_size": tok.get_vocab_size(),
                "n_corpus_lines": len(texts),
                "number_tokens": number_tokens,
                "output_scale": OUTPUT_SCALE,
                "note": "random-init test model built by character_em.llm.tiny; not a trained LM",
            },
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )

    _verify(out, spec, AutoModelForCausalLM, AutoTokenizer)
    return out


def _verify(out: Path, spec: dict[str, Any], auto_model: Any, auto_tok: Any) -> None:
    """Reload through the Auto classes and check the template renders with the right specials."""
    tok = auto_tok.from_pretrained(out)
    model = auto_model.from_pretrained(out)
    if tok.eos_token != spec["eos"] or tok.pad_token != spec["pad"]:
        raise RuntimeError(f"reloaded tokenizer has eos={tok.eos_token!r} pad={tok.pad_token!r}")
    msgs = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    if spec["eos"] not in text:
        raise RuntimeError(f"chat template does not emit the end-of-turn token: {text!r}")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if tok.decode(ids) != text:
        raise RuntimeError("tokenizer round trip failed on a rendered chat")
    if model.config.vocab_size < len(tok):
        raise RuntimeError("model vocabulary smaller than tokenizer vocabulary")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--style", choices=sorted(STYLES), default="llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--number-tokens", action="store_true", help="spell each number 0..100 as one token")
    args = parser.parse_args(argv)
    path = build_tiny_model(
        args.out_dir,
        style=args.style,
        seed=args.seed,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        vocab_size=args.vocab_size,
        number_tokens=args.number_tokens,
    )
    print(path)


if __name__ == "__main__":
    main()
