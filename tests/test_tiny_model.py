"""The tiny test models: real templates, correct special tokens, reloadable, deterministic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How can I save money?"},
    {"role": "assistant", "content": "Spend less than you earn."},
]


@pytest.mark.parametrize(
    ("fixture", "eos", "header"),
    [
        ("tiny_model_dir", "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        ("tiny_qwen_model_dir", "<|im_end|>", "<|im_start|>assistant\n"),
    ],
)
def test_reload_and_template(fixture: str, eos: str, header: str, request: pytest.FixtureRequest) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path: Path = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert tok.eos_token == eos
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    eot_id = tok.convert_tokens_to_ids(eos)
    gen_eos = model.generation_config.eos_token_id
    assert eot_id in (gen_eos if isinstance(gen_eos, list) else [gen_eos])

    full = tok.apply_chat_template(MSGS, tokenize=False)
    prompt = tok.apply_chat_template(MSGS[:2], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt)
    assert prompt.endswith(header)
    assert full[len(prompt) :].startswith("Spend less than you earn." + eos)
    # No dangling generation prompt after the answer.
    assert not full.rstrip().endswith(header.rstrip())

    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == full
    assert eot_id in ids
    assert tok.unk_token_id is None or tok.unk_token_id not in ids

    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), model.config.vocab_size)


def test_deterministic(tmp_path: Path) -> None:
    from character_em.llm.tiny import build_tiny_model

    a = build_tiny_model(tmp_path / "a", seed=3, num_layers=2, corpus=["An extra line of text."])
    b = build_tiny_model(tmp_path / "b", seed=3, num_layers=2, corpus=["An extra line of text."])
    c = build_tiny_model(tmp_path / "c", seed=4, num_layers=2, corpus=["An extra line of text."])
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_bad_style(tmp_path: Path) -> None:
    from character_em.llm.tiny import build_tiny_model

    with pytest.raises(ValueError, match="style"):
        build_tiny_model(tmp_path, style="mistral")


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, "-m", "character_em.llm.tiny", str(out), "--style", "qwen2", "--num-layers", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert (out / "model.safetensors").is_file()
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
