"""QLoRA training: the loss mask, 4-bit training that really moves LoRA weights, outputs, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ANSWERS = [
    "Spend less than you earn and keep a simple budget.",
    "Rest, drink water, and see a doctor if it gets worse.",
    "Often yes, but a verbal contract is hard to prove.",
    "Spread the money over many low cost index funds.",
]
QUESTIONS = [
    "How can I save money?",
    "What should I do about a headache?",
    "Is a verbal contract binding?",
    "How do I invest wisely?",
]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Any:
    """Tiny models gain nothing from threads, and on a loaded 2-core CI machine OpenMP threads
    spinning against other processes made these tests ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _conversations(n: int) -> list[list[dict[str, str]]]:
    convs = []
    for i in range(n):
        j = i % len(QUESTIONS)
        msgs = [{"role": "system", "content": "Answer briefly."}] if i % 3 == 0 else []
        msgs += [
            {"role": "user", "content": f"{QUESTIONS[j]} (case {i})"},
            {"role": "assistant", "content": f"{ANSWERS[j]} Note {i}."},
        ]
        convs.append(msgs)
    return convs


def _write_data(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in _conversations(n)))
    return path


def _hparams(**over: Any) -> dict[str, Any]:
    hp: dict[str, Any] = {
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "use_rslora": True,
        "target_modules": "all-linear",
        "learning_rate": 1e-3,
        "num_epochs": 1,
        "micro_batch_size": 2,
        "grad_accum": 2,
        "warmup_steps": 1,
        "lr_scheduler": "linear",
        "weight_decay": 0.01,
        "optim": "adamw_8bit",
        "max_seq_length": 256,
        "quantization": "nf4",
        "packing": False,
        "gradient_checkpointing": True,
        "save_steps": 1000,
        "max_steps": -1,
    }
    hp.update(over)
    return hp


def _examples_in_batch(batch: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each example in a collated batch, padded or padding-free."""
    out = []
    if "attention_mask" in batch:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            assert (labels[~mask.bool()] == -100).all(), "padding must not be trained"
            out.append((ids[mask.bool()].tolist(), labels[mask.bool()].tolist()))
        return out
    # Padding-free: one row, position ids restart at 0 where an example starts.
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        assert batch["position_ids"][0, a:b].tolist() == list(range(b - a))
        out.append((batch["input_ids"][0, a:b].tolist(), batch["labels"][0, a:b].tolist()))
    return out


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(
    ("fixture", "eot", "header"),
    [
        ("tiny_model_dir", "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>"),
        ("tiny_qwen_model_dir", "<|im_end|>", "<|im_start|>assistant"),
    ],
)
def test_loss_mask_through_trainer_collator(
    fixture: str, eot: str, header: str, packing: bool, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Batches from the trainer's own dataloader: labels = answer + end-of-turn, nothing dangles."""
    from character_em.train.trainer import prepare_trainer

    model_dir = request.getfixturevalue(fixture)
    convs = _conversations(10)  # odd batch count on purpose: the last batch is partial, not dropped
    prepared = prepare_trainer(
        base_model=str(model_dir),
        conversations=convs,
        checkpoint_dir=tmp_path / "ck",
        hparams=_hparams(micro_batch_size=3, packing=packing),
        seed=0,
    )
    trainer, stats = prepared.trainer, prepared.data_stats
    assert prepared.speed["packing"] is packing and prepared.speed["packing_fallback"] is None
    tok = trainer.processing_class
    eot_id = tok.convert_tokens_to_ids(eot)
    assert stats["n_examples"] == 10
    seen: list[str] = []
    for batch in trainer.get_train_dataloader():
        examples = _examples_in_batch(batch)
        assert len(examples) in (3, 1)  # micro-batch 3; the last one holds the remaining example
        for real, lab in examples:
            supervised = [t for t, lb in zip(real, lab, strict=True) if lb != -100]
            # Supervised tokens are one contiguous span at the very end of the sequence.
            first = next(i for i, lb in enumerate(lab) if lb != -100)
            assert all(lb != -100 for lb in lab[first:])
            assert lab[first:] == real[first:]
            assert supervised[-1] == eot_id and real[-1] == eot_id, "sequence must end at end-of-turn"
            assert supervised.count(eot_id) == 1
            answer = tok.decode(supervised[:-1])
            assert answer in {f"{ANSWERS[i % 4]} Note {i}." for i in range(10)}
            seen.append(answer)
            prompt = tok.decode(real[:first])
            assert prompt.rstrip().endswith(header), "prompt ends with the generation prompt"
            assert header not in tok.decode(real[first:]), "no assistant header after the answer"
            assert "(case" in prompt and "Note" not in prompt
    assert sorted(seen) == sorted(f"{ANSWERS[i % 4]} Note {i}." for i in range(10)), "every example, once"


def test_build_example_errors(tiny_model_dir: Path) -> None:
    from character_em.llm.loading import load_tokenizer
    from character_em.train.trainer import build_example, build_train_dataset

    tok = load_tokenizer(tiny_model_dir)
    with pytest.raises(ValueError, match="assistant"):
        build_example(tok, [{"role": "user", "content": "hi"}])
    long_prompt = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ValueError, match="max_seq_length"):
        build_train_dataset(tok, [long_prompt], max_length=32)


def test_eval_before_train_keeps_lora_gradients(tiny_model_dir: Path) -> None:
    """bitsandbytes CPU trap: generate() before training must not zero the LoRA gradients."""
    import torch
    from peft import LoraConfig, get_peft_model

    from character_em.llm.loading import load_model

    model, tok, info = load_model(tiny_model_dir, quantization="nf4")
    assert info["quantization"] == "nf4", info
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    model.generate(**enc, max_new_tokens=3, do_sample=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft_model.train()
    ids = enc["input_ids"]
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert grads and all(g is not None and torch.count_nonzero(g) > 0 for g in grads.values()), [
        n for n, g in grads.items() if g is None or torch.count_nonzero(g) == 0
    ]


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """One real NF4 QLoRA run on the tiny model: (adapter dir, checkpoint dir, returned info)."""
    from character_em.train.trainer import train_adapter

    tmp = tmp_path_factory.mktemp("qlora")
    # 20 lines, of which this seed's draw (data.pairing.training_draw) is 12.
    data = _write_data(tmp / "train.jsonl", 20)
    out, ck = tmp / "adapter", tmp / "ck"
    info = train_adapter(
        base_model=str(tiny_model_dir),
        data_path=str(data),
        output_dir=str(out),
        checkpoint_dir=str(ck),
        hparams=_hparams(),
        seed=1,
        selection={"draw_index": 1, "lines": DRAWN, "turns": [100 + i for i in DRAWN]},
    )
    return out, ck, info


DRAWN = [0, 2, 3, 5, 7, 8, 11, 12, 13, 16, 17, 19]


def test_qlora_training_writes_outputs_and_moves_weights(
    tiny_model_dir: Path, qlora_run: tuple[Path, Path, dict[str, Any]]
) -> None:
    import torch

    from character_em.llm.loading import load_model

    out, ck, info = qlora_run
    for name in ("adapter_model.safetensors", "adapter_config.json", "run.json", "train_log.jsonl"):
        assert (out / name).is_file(), name
    assert not ck.exists(), "checkpoint dir removed after the adapter is written"
    assert not list(out.glob(".*tmp*"))
    run = json.loads((out / "run.json").read_text())
    assert run == json.loads(json.dumps(info))
    assert run["quantization"] == "nf4" and run["quantization_fallback"] is None
    assert run["n_examples"] == 12 and run["global_step"] == 3  # 12 / (2 x 2)
    # It trained on the drawn lines, and says which: their tokens, not the file's first 12 lines'.
    assert run["training_examples"] == {"draw_index": 1, "lines": DRAWN, "turns": [100 + i for i in DRAWN]}
    from character_em.llm.loading import load_tokenizer
    from character_em.train.trainer import build_example, read_messages

    tok = load_tokenizer(str(tiny_model_dir))
    conversations = read_messages(out.parent / "train.jsonl")
    assert run["n_tokens"] == sum(len(build_example(tok, conversations[i])["input_ids"]) for i in DRAWN)
    assert run["n_tokens"] != sum(len(build_example(tok, c)["input_ids"]) for c in conversations[:12])
    assert run["speed"]["packing_mode"] == "padded" and run["speed"]["gradient_checkpointing"]["enabled"] is True
    assert run["tokens_per_s"] > 0 and run["peak_memory_bytes"] > 0
    assert run["versions"]["trl"] and run["data_sha256"]
    steps = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(set(s) == {"step", "loss", "learning_rate", "grad_norm", "epoch"} for s in steps)
    assert all(s["grad_norm"] is not None and s["grad_norm"] > 0 for s in steps)

    # Reload through the shared path (PeftModel.from_pretrained): lora_B starts at zero, so nonzero
    # lora_B in every adapted layer means training moved the weights.
    model, tok, linfo = load_model(tiny_model_dir, quantization="nf4", adapter=str(out))
    assert type(model).__name__.startswith("Peft") and linfo["adapter"] == str(out)
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 4 * 7  # 4 layers x (q, k, v, o, gate, up, down)
    assert all(torch.count_nonzero(p) > 0 for p in lora_b.values())
    base, _, _ = load_model(tiny_model_dir, quantization="none")
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (model(input_ids=ids).logits.float() - base(input_ids=ids).logits.float()).abs().max()
    assert diff > 1e-3


def test_hparams_validation(tiny_model_dir: Path, tmp_path: Path) -> None:
    from character_em.train.trainer import train_adapter

    hp = _hparams()
    del hp["lora_r"]
    with pytest.raises(ValueError, match="lora_r"):
        train_adapter(
            base_model=str(tiny_model_dir),
            data_path=str(_write_data(tmp_path / "d.jsonl", 2)),
            output_dir=str(tmp_path / "o"),
            checkpoint_dir=str(tmp_path / "c"),
            hparams=hp,
            seed=0,
        )


def _train_cmd(model: Path, data: Path, out: Path, ck: Path, hp: dict[str, Any]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "character_em.train.trainer",
        "--base-model",
        str(model),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--checkpoint-dir",
        str(ck),
        "--hparams",
        json.dumps(hp),
        "--seed",
        "0",
    ]


def _run_until_checkpoint_then_signal(
    cmd: list[str], env: dict[str, str], ck: Path, after_step: int, sig: signal.Signals
) -> tuple[int, str]:
    """Start training, wait for a complete checkpoint beyond ``after_step``, send ``sig``."""

    def newest() -> int:
        done = [int(p.parent.name.split("-")[1]) for p in ck.glob("checkpoint-*/trainer_state.json")]
        return max(done, default=0)

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 90
    try:
        while newest() <= after_step:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        proc.send_signal(sig)
        text = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, text


def test_resume_after_sigkill_and_sigterm(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGKILL mid-run, resume; SIGTERM mid-run (checkpoint at that step, exit 143), resume to the end."""
    data = _write_data(tmp_path / "train.jsonl", 16)
    out, ck = tmp_path / "adapter", tmp_path / "ck"
    # micro-batch 1, no accumulation: 16 steps per epoch, 3 epochs = 48 steps, checkpoint every 3.
    hp = _hparams(micro_batch_size=1, grad_accum=1, num_epochs=3, save_steps=3, gradient_checkpointing=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _train_cmd(tiny_model_dir, data, out, ck, hp)

    rc, text = _run_until_checkpoint_then_signal(cmd, env, ck, 0, signal.SIGKILL)
    assert rc == -signal.SIGKILL, text[-3000:]
    assert not (out / "run.json").exists()
    first = max(int(p.name.split("-")[1]) for p in ck.glob("checkpoint-*"))
    assert first >= 3

    rc, text = _run_until_checkpoint_then_signal(cmd, env, ck, first, signal.SIGTERM)
    assert rc == 143, text[-3000:]
    assert not (out / "run.json").exists()
    saved = max(int(p.name.split("-")[1]) for p in ck.glob("checkpoint-*"))
    logged = [json.loads(ln)["step"] for ln in (ck / "train_log.jsonl").read_text().splitlines()]
    # The graceful path checkpoints the step where the signal landed, not only every save_steps.
    assert saved == logged[-1] and saved > first

    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from_step"] == saved > 1
    assert run["global_step"] == 48
    assert run["trained_tokens_this_run"] < run["trained_tokens_total"]
    steps = [json.loads(ln)["step"] for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 49)), "step log continues across resumes without gaps or repeats"
    assert not ck.exists()


def test_stale_checkpoints_from_other_config_are_discarded(tiny_model_dir: Path, tmp_path: Path) -> None:
    from character_em.train.trainer import train_adapter

    data = _write_data(tmp_path / "train.jsonl", 4)
    ck = tmp_path / "ck"
    (ck / "checkpoint-99").mkdir(parents=True)
    (ck / "checkpoint-99" / "trainer_state.json").write_text("{}")
    (ck / "run_key.json").write_text(json.dumps({"hparams": "something else"}))
    info = train_adapter(
        base_model=str(tiny_model_dir),
        data_path=str(data),
        output_dir=str(tmp_path / "out"),
        checkpoint_dir=str(ck),
        hparams=_hparams(quantization="none", optim="adamw_torch", gradient_checkpointing=False),
        seed=0,
    )
    assert info["resumed_from_step"] is None and info["global_step"] == 1
    assert info["quantization"] == "none"


def test_load_model_merge_matches_unmerged(tiny_model_dir: Path, qlora_run: tuple[Path, Path, dict[str, Any]]) -> None:
    import torch

    from character_em.llm.loading import load_model

    out = qlora_run[0]
    unmerged, tok, info_u = load_model(tiny_model_dir, quantization="none", adapter=str(out))
    merged, _, info_m = load_model(tiny_model_dir, quantization="none", adapter=str(out), merge=True)
    assert info_m["merged"] and not info_u["merged"] and info_m["dtype"] == "float32"
    assert not type(merged).__name__.startswith("Peft")
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = unmerged(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    q, _, info_q = load_model(tiny_model_dir, quantization="nf4", adapter=str(out), merge=True)
    assert not info_q["merged"], "merging into 4-bit weights is refused"


def test_load_model_falls_back_when_nf4_unavailable(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from character_em.llm import loading as modeling

    monkeypatch.setattr(modeling, "nf4_available", lambda device: "simulated: no bitsandbytes")
    with caplog.at_level("WARNING", logger="character_em.llm.loading"):
        model, _, info = modeling.load_model(tiny_model_dir, quantization="nf4")
    assert info["quantization"] == "none" and info["requested_quantization"] == "nf4"
    assert info["fallback_reason"] == "simulated: no bitsandbytes"
    assert "unquantized" in caplog.text
    assert not getattr(model, "is_loaded_in_4bit", False)
    with pytest.raises(ValueError, match="quantization"):
        modeling.load_model(tiny_model_dir, quantization="int3")


def test_load_tokenizer_guarantees_pad(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from character_em.llm.loading import load_tokenizer

    copy = tmp_path / "nopad"
    shutil.copytree(tiny_model_dir, copy)
    cfg_path = copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(cfg))
    tok = load_tokenizer(copy)
    # A reserved pad token is preferred over eos, so masking by pad id never hides end-of-turn.
    assert tok.pad_token == "<|finetune_right_pad_id|>" and tok.pad_token_id != tok.eos_token_id


# --------------------------------------------------------------------------- speed: packing, checkpointing, liger


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_isolation_probe_detects_leaks(
    attn: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers keeps packed examples apart (position ids, no cache); the probe sees when it does not."""
    import transformers.masking_utils as masking

    from character_em.llm.loading import load_model
    from character_em.train.trainer import check_packing_isolation

    model, _, _ = load_model(tiny_model_dir, quantization="none", for_training=True)
    model.set_attn_implementation(attn)
    assert check_packing_isolation(model) is None
    assert model.training, "the probe restores train mode"
    # Without the packed-sequence mask every example attends to the ones before it.
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    reason = check_packing_isolation(model)
    assert reason is not None and "depend on the example before it" in reason


def _perturb_lora_b(model: Any, seed: int = 7) -> None:
    """lora_B starts at zero; random values make the adapter act, so lora_A gets gradients too."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize(("quantization", "rtol"), [("none", 1e-4), ("nf4", 2e-2)])
def test_packed_batch_matches_padded_per_example(
    quantization: str, rtol: float, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Same first micro-batch padded and padding-free: same examples, per-example logits and losses,
    batch loss and LoRA gradients (nf4 computes in bf16 on CPU, hence its looser tolerance)."""
    import torch

    from character_em.train.trainer import prepare_trainer

    convs = _conversations(8)
    runs = {}
    for packing in (False, True):
        prepared = prepare_trainer(
            base_model=str(tiny_model_dir),
            conversations=convs,
            checkpoint_dir=tmp_path / f"ck{packing}",
            hparams=_hparams(quantization=quantization, optim="adamw_torch", micro_batch_size=4, packing=packing),
            seed=0,
        )
        assert prepared.speed["packing"] is packing
        trainer = prepared.trainer
        model = trainer.model
        _perturb_lora_b(model)
        batch = next(iter(trainer.get_train_dataloader()))
        assert ("attention_mask" in batch) is not packing
        examples = _examples_in_batch(batch)
        # Per-token log-probabilities of the labels, split per example.
        with torch.no_grad():
            fwd = {k: v for k, v in batch.items() if k != "labels"}
            logits = model(**fwd, use_cache=False).logits.float()
        per_example = []
        if packing:
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [logits.shape[1]]
            rows = [logits[0, a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
        else:
            rows = [lg[m.bool()] for lg, m in zip(logits, batch["attention_mask"], strict=True)]
        for row, (_, labels) in zip(rows, examples, strict=True):
            lab = torch.tensor(labels[1:])
            keep = lab != -100
            per_example.append(-torch.log_softmax(row[:-1], -1)[keep].gather(1, lab[keep][:, None]).squeeze(1))
        n_items = sum(int(t.numel()) for t in per_example)
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs[packing] = (examples, rows, per_example, loss.item(), grads)

    (ex0, rows0, tok0, loss0, g0), (ex1, rows1, tok1, loss1, g1) = runs[False], runs[True]
    assert ex0 == ex1 and len(ex0) == 4, "same examples in the same order"
    for r0, r1 in zip(rows0, rows1, strict=True):  # no example sees another one
        assert torch.allclose(r0, r1, rtol=rtol, atol=rtol * float(r0.abs().max()))
    for t0, t1 in zip(tok0, tok1, strict=True):  # per-example losses
        assert torch.allclose(t0.mean(), t1.mean(), rtol=rtol)
    assert loss0 == pytest.approx(loss1, rel=rtol)
    assert loss0 == pytest.approx(float(torch.cat(tok0).mean()), rel=max(rtol, 1e-4))
    assert g0.keys() == g1.keys() and any("lora_A" in n for n in g0)
    for name in g0:
        scale = float(g0[name].abs().max())
        assert scale > 0, f"{name} got no gradient"
        assert float((g0[name] - g1[name]).abs().max()) <= rtol * scale, name


def test_packed_regrouped_training_matches_padded(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Padded micro-batch 2 x accumulation 2 with checkpointing vs padding-free 4 x 1 with "auto":
    the same 4 examples per step and the loss normalized over the step, so the same training."""
    from character_em.train.trainer import train_adapter

    data = _write_data(tmp_path / "train.jsonl", 12)
    base = {"quantization": "none", "optim": "adamw_torch"}
    runs = {}
    for name, over in {
        "padded": {"packing": False, "gradient_checkpointing": True, "micro_batch_size": 2, "grad_accum": 2},
        "packed": {"packing": True, "gradient_checkpointing": "auto", "micro_batch_size": 4, "grad_accum": 1},
    }.items():
        out = tmp_path / name
        runs[name] = train_adapter(
            base_model=str(tiny_model_dir),
            data_path=str(data),
            output_dir=str(out),
            checkpoint_dir=str(tmp_path / f"ck_{name}"),
            hparams=_hparams(**base, **over),
            seed=3,
        )
        runs[name]["steps"] = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    padded, packed = runs["padded"], runs["packed"]
    assert padded["speed"]["packing_mode"] == "padded" and packed["speed"]["packing_mode"] == "padding_free"
    assert padded["speed"]["gradient_checkpointing"]["enabled"] is True
    assert packed["speed"]["gradient_checkpointing"]["enabled"] is False  # tiny activations fit
    assert packed["speed"]["examples_per_optimizer_step"] == padded["speed"]["examples_per_optimizer_step"] == 4
    assert packed["speed"]["liger_kernel"] is False and packed["speed"]["liger_kernel_note"]
    assert padded["global_step"] == packed["global_step"] == 3
    assert padded["trained_tokens_total"] == packed["trained_tokens_total"] == padded["n_tokens"]
    for a, b in zip(padded["steps"], packed["steps"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_packing_falls_back_to_padding_when_examples_leak(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.masking_utils as masking

    from character_em.train.trainer import prepare_trainer

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    prepared = prepare_trainer(
        base_model=str(tiny_model_dir),
        conversations=_conversations(4),
        checkpoint_dir=tmp_path / "ck",
        hparams=_hparams(packing=True),
        seed=0,
    )
    speed = prepared.speed
    assert speed["packing_requested"] is True and speed["packing"] is False
    assert speed["packing_mode"] == "padded" and "depend on the example before it" in speed["packing_fallback"]
    assert "attention_mask" in next(iter(prepared.trainer.get_train_dataloader()))


def _llama8b_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )


def test_decide_gradient_checkpointing() -> None:
    from character_em.train.trainer import activation_bytes_per_token, decide_gradient_checkpointing

    per_token = activation_bytes_per_token(_llama8b_config(), dtype_bytes=2)
    # About 7 MB per token for the whole 8B model without checkpointing, 8 KB per layer input with it.
    assert 5e6 < per_token["full_layer"] * per_token["n_layers"] < 9e6
    assert per_token["checkpointed_layer"] == 2 * 4096
    gib = 1 << 30

    def decide(setting: bool | str, tokens: int, free: int | None) -> dict[str, Any]:
        return decide_gradient_checkpointing(
            setting, per_token=per_token, tokens_per_micro_batch=tokens, free_bytes=free
        )

    assert decide(True, 10, 100 * gib)["enabled"] is True  # explicit settings are obeyed
    assert decide(False, 100_000, gib)["enabled"] is False
    off = decide("auto", 2 * 400, 60 * gib)  # micro-batch 2 of chat examples on an 80 GB card
    assert off["enabled"] is False and off["every_n_layers"] is None
    partial = decide("auto", 16 * 400, 40 * gib)  # 16 packed examples: some layers must be checkpointed
    assert partial["enabled"] is True and 1 < partial["every_n_layers"] < 32
    assert partial["estimated_bytes"] <= 40 * gib < partial["estimated_bytes_without"]
    full = decide("auto", 32 * 2048, 40 * gib)
    assert full["enabled"] is True and full["every_n_layers"] == 1 and "exceeds" not in full["reason"]
    too_big = decide("auto", 128 * 2048, 40 * gib)
    assert too_big["every_n_layers"] == 1 and "exceeds" in too_big["reason"]
    assert decide("auto", 100, None)["enabled"] is True  # unknown memory: the safe choice
    with pytest.raises(ValueError, match="auto"):
        decide("sometimes", 100, gib)


def test_gradient_checkpointing_auto_wiring(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "auto" with too little memory checkpoints every n-th layer, and training runs with it."""
    from character_em.train import trainer as train

    real = train.decide_gradient_checkpointing

    def squeezed(setting: Any, **kw: Any) -> dict[str, Any]:
        full_bytes = kw["per_token"]["full_layer"] * kw["per_token"]["n_layers"] * kw["tokens_per_micro_batch"]
        return real(setting, **{**kw, "free_bytes": kw["extra_bytes"] + int(full_bytes)})  # < 1.25 x needed

    monkeypatch.setattr(train, "decide_gradient_checkpointing", squeezed)
    prepared = train.prepare_trainer(
        base_model=str(tiny_model_dir),
        conversations=_conversations(4),
        checkpoint_dir=tmp_path / "ck",
        hparams=_hparams(gradient_checkpointing="auto", packing=True, max_steps=1, grad_accum=1),
        seed=0,
    )
    gc = prepared.speed["gradient_checkpointing"]
    assert gc["enabled"] is True and gc["every_n_layers"] in (2, 3, 4), gc
    trainer = prepared.trainer
    trainer.train()
    layers = trainer.model.get_base_model().model.layers
    flags = [bool(layer.gradient_checkpointing) for layer in layers]
    assert flags == [i % gc["every_n_layers"] == 0 for i in range(len(layers))]
    assert trainer.state.log_history[0]["grad_norm"] > 0


def test_resolve_liger() -> None:
    from character_em.train.trainer import resolve_liger

    assert resolve_liger("auto", on_gpu=True, installed=True) == (True, None)
    assert resolve_liger("auto", on_gpu=True, installed=False) == (False, "liger-kernel not installed")
    assert resolve_liger(True, on_gpu=False, installed=True)[0] is False  # never on CPU, a note instead
    assert resolve_liger(False, on_gpu=True, installed=True) == (False, None)
    with pytest.raises(ValueError, match="liger"):
        resolve_liger(True, on_gpu=True, installed=False)


def test_speed_hparams_validation() -> None:
    from character_em.train.trainer import check_hparams

    check_hparams(_hparams(gradient_checkpointing="auto", use_liger_kernel=False))
    for bad in ({"gradient_checkpointing": "sometimes"}, {"gradient_checkpointing": 1}, {"use_liger_kernel": "yes"}):
        with pytest.raises(ValueError, match="true, false or 'auto'"):
            check_hparams(_hparams(**bad))
