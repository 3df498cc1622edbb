"""The hf judge back-end: exact expected scores over number token sequences.

The math is checked against hand computations on toy models whose next-token distributions are set by
hand (a bigram table), with two toy tokenizers: one that splits numbers into digits (as Qwen's does) and
one that spells every number 0..100 as one token (as Llama-3's does). The batched KV-cache path is
checked against the plain full-sequence path on the real tiny chat models.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from character_em.judge import core as J
from character_em.judge import verdicts
from character_em.judge.hf_backend import (
    CandidateTree,
    HFJudge,
    candidate_strings,
    continuation_ids,
    sequence_logprobs,
    verdict_from_sequence_logprobs,
)

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Any:
    # Tiny matmuls on a shared 2-core CI box: extra threads only add synchronization (10x slower here).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Bigram(torch.nn.Module):
    """A 'language model' whose next token depends only on the previous one, with chosen probabilities.
    Mass not assigned in a row goes to ``other``."""

    def __init__(self, vocab_size: int, table: dict[int, dict[int, float]], other: int, eos: int) -> None:
        super().__init__()
        logp = torch.full((vocab_size, vocab_size), -1.0e4)
        for prev in range(vocab_size):
            dist = dict(table.get(prev, {}))
            dist[other] = dist.get(other, 0.0) + max(0.0, 1.0 - sum(dist.values()))
            for tok, p in dist.items():
                if p > 0:
                    logp[prev, tok] = math.log(p)
        self.register_buffer("table", logp)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.generation_config = SimpleNamespace(eos_token_id=eos)

    def forward(self, input_ids: Any, **kwargs: Any) -> Any:
        return SimpleNamespace(logits=self.table[input_ids])


def toy_tokenizer(vocab: dict[str, int], split: str) -> Any:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(vocab, unk_token="<p>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(split), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eot>", unk_token="<p>", pad_token="<p>")
    # Any text is unknown (<p>) to the toy vocabulary, so the prompt always ends in <p>, whose row of
    # the bigram table is the judge's first-token distribution.
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    )
    return tok


def _request(metric: str = "coherence") -> verdicts.JudgeRequest:
    tpl = J.metric_template(metric, [])
    return verdicts.JudgeRequest(metric, J.build_judge_prompt(tpl, "Q?", "an answer"), "Q?", "an answer")


def test_digit_split_tokenizer_exact_score_by_hand() -> None:
    """Qwen-like: "85" is "8","5". Hand computation:
    p(8)=P(8|p)P(eot|8)=.5*.6=.3   p(85)=.5*.4*P(eot|5)=.2   p(1)=.2*.5=.1
    p(10)=.2*.5*P(eot|0)=.05       p(100)=.2*.5*.5*.5=.025   everything else 0
    mass=.675, score=(8*.3+85*.2+1*.1+10*.05+100*.025)/.675 = 22.5/.675 = 33.333...
    (Reading only the first token would give (8*.5+1*.2)/.7 = 6.0.)"""
    vocab = {str(d): d for d in range(10)} | {"<eot>": 10, "X": 11, "<p>": 12}
    EOT, X, P = 10, 11, 12
    table = {P: {8: 0.5, 1: 0.2}, 8: {EOT: 0.6, 5: 0.4}, 5: {EOT: 1.0}, 1: {EOT: 0.5, 0: 0.5}, 0: {EOT: 0.5, 0: 0.5}}
    model = Bigram(len(vocab), table, other=X, eos=EOT)
    tok = toy_tokenizer(vocab, ".")
    judge = HFJudge.from_loaded(model, tok, use_cache=False)
    res = judge.score_one(_request())
    assert res.label == "ok" and res.method == "exact"
    assert res.score == pytest.approx(22.5 / 0.675, abs=1e-4)
    # The number spellings really are digit by digit, and the candidate events are disjoint.
    conts = continuation_ids(
        tok, "x:", tok("x:", add_special_tokens=False)["input_ids"], candidate_strings("coherence")
    )
    assert conts[85] == [8, 5] and conts[100] == [1, 0, 0] and conts[7] == [7]
    logps = sequence_logprobs(model, [P], conts, [EOT], use_cache=False)
    probs = {n: math.exp(lp) for n, lp in zip(range(101), logps, strict=True)}
    assert probs[8] == pytest.approx(0.3) and probs[85] == pytest.approx(0.2) and probs[10] == pytest.approx(0.05)
    assert sum(probs.values()) == pytest.approx(0.675)
    # Under the minimum numeric mass, the verdict is discarded with its reason.
    strict = HFJudge.from_loaded(model, tok, use_cache=False, min_numeric_mass=0.7).score_one(_request())
    assert math.isnan(strict.score) and strict.reason == "low_numeric_mass"


def test_single_token_number_tokenizer_exact_score_by_hand() -> None:
    """Llama-3-like: every number 0..100 is one token.
    p(85)=.5*.8=.4  p(100)=.2*1=.2  p(7)=.1*.5=.05  mass=.65  score=(34+20+.35)/.65."""
    vocab = {str(n): n for n in range(101)} | {"<eot>": 101, "X": 102, "<p>": 103}
    EOT, X, P = 101, 102, 103
    table = {P: {85: 0.5, 100: 0.2, 7: 0.1}, 85: {EOT: 0.8}, 100: {EOT: 1.0}, 7: {EOT: 0.5}}
    model = Bigram(len(vocab), table, other=X, eos=EOT)
    tok = toy_tokenizer(vocab, r"100|[1-9]?[0-9]|.")
    judge = HFJudge.from_loaded(model, tok, use_cache=False)
    res = judge.score_one(_request("alignment"))
    assert res.label == "ok" and res.score == pytest.approx(54.35 / 0.65, abs=1e-4)
    conts = judge._continuations(tok, "alignment", "x:", tok("x:", add_special_tokens=False)["input_ids"])
    assert conts[85] == [85] and conts[100] == [100]


def test_first_token_scoring_by_hand_and_where_auto_allows_it() -> None:
    """The same Llama-3-like toy, scored by first token: p(n) = p(n's token | prompt), no end-of-turn factor.
    p(85)=.5  p(100)=.2  p(7)=.1  mass=.8  score=(42.5+20+.7)/.8 = 79.0; REFUSAL's first token "R" = .05.
    (The exact score above is 83.6: the judge would add text after 85 a fifth of the time.)"""
    vocab = {str(n): n for n in range(101)} | {"<eot>": 101, "X": 102, "<p>": 103, "R": 104, "C": 105}
    EOT, X, P = 101, 102, 103
    table = {P: {85: 0.5, 100: 0.2, 7: 0.1, 104: 0.05}, 85: {EOT: 0.8}, 100: {EOT: 1.0}, 7: {EOT: 0.5}}
    model = Bigram(len(vocab), table, other=X, eos=EOT)
    tok = toy_tokenizer(vocab, r"100|[1-9]?[0-9]|.")
    judge = HFJudge.from_loaded(model, tok, scoring="auto", use_cache=False)
    assert judge.resolved_scoring() == "first-token" and judge.effective_params()["scoring"] == "first-token"
    res = judge.score_one(_request("alignment"))
    assert res.label == "ok" and res.method == "first-token"
    assert res.score == pytest.approx(63.2 / 0.8, abs=1e-4)
    assert '"REFUSAL":0.05' in res.raw.replace(" ", "")
    assert judge.stats["forward_passes"] == 1  # one pass of the prompt, no candidate tree
    # The exact view of the same loaded judge scores by the exact definition, under its own hash.
    exact = judge.with_scoring("exact")
    assert exact.score_one(_request("alignment")).method == "exact"
    assert exact.effective_params()["scoring"] == "exact" != judge.effective_params()["scoring"]
    # A digit-splitting tokenizer: auto means exact (the exact judge's hash), first-token is refused.
    digits = toy_tokenizer({str(d): d for d in range(10)} | {"<eot>": 10, "X": 11, "<p>": 12}, ".")
    split = Bigram(13, {}, other=11, eos=10)
    assert HFJudge.from_loaded(split, digits, scoring="auto").effective_params()["scoring"] == "exact"
    with pytest.raises(verdicts.JudgeConfigError, match=r"judge.scoring: first-token .* \('10' is 2 tokens\)"):
        HFJudge.from_loaded(split, digits, scoring="first-token").resolved_scoring()
    with pytest.raises(
        verdicts.JudgeConfigError,
        match="judge.quantization: .fp8. cannot be loaded by the hf judge.*fp8 needs judge.backend: vllm",
    ):
        HFJudge.from_config({"model": "m", "quantization": "fp8"})


def test_escape_replies_and_verdict_rules() -> None:
    strings = candidate_strings("alignment")
    assert strings[-2:] == ["REFUSAL", "CODE"] and candidate_strings("coherence")[-1] == "100"
    logps = [math.log(0.001)] * 101 + [math.log(0.6), math.log(0.01)]
    res = verdict_from_sequence_logprobs("alignment", strings, logps)
    assert res.label == "refusal" and math.isnan(res.score)
    logps = [math.log(1e-9)] * 101 + [math.log(0.01), math.log(0.02)]
    logps[40] = math.log(0.5)
    res = verdict_from_sequence_logprobs("alignment", strings, logps)
    assert res.label == "ok" and res.score == pytest.approx(40.0, abs=1e-4)


def test_candidate_tree_shares_prefixes_and_each_node_sees_only_its_ancestors() -> None:
    digits = [[int(ch) for ch in str(n)] for n in range(101)]
    tree = CandidateTree.build(digits)
    assert len(tree.tokens) == 10 + 90 + 1  # "0".."9", "10".."99", and "100" on top of "10"
    path = tree.paths[100]
    assert [tree.tokens[i] for i in path] == [1, 0, 0] and [tree.depths[i] for i in path] == [0, 1, 2]
    assert tree.paths[10] == path[:2] and tree.paths[1] == path[:1]
    mask = tree.attention_mask(3, "boolean", "cpu")[0, 0]
    assert mask.shape == (101, 3 + 101) and bool(mask[:, :3].all())
    assert {j - 3 for j in mask[path[2]].nonzero().flatten().tolist() if j >= 3} == set(path)
    assert {j - 3 for j in mask[tree.paths[42][1]].nonzero().flatten().tolist() if j >= 3} == set(tree.paths[42])
    additive = tree.attention_mask(3, "additive", "cpu")[0, 0]
    assert torch.equal(additive == 0, mask) and float(additive.min()) < -1e30


def test_tree_path_refuses_attention_that_builds_its_own_mask(tiny_model_dir: Path) -> None:
    model, _ = HFJudge(model=str(tiny_model_dir), quantization="none", device="cpu")._load()
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match="flex_attention.*'sdpa' or 'eager'"):
        sequence_logprobs(model, [1, 2, 3], [[4], [4, 5]], [6])


def test_prompt_beyond_a_sliding_window_is_scored_as_full_sequences(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, _ = HFJudge(model=str(tiny_model_dir), quantization="none", device="cpu")._load()
    conts = [[4], [4, 5], [7, 8, 9]]
    full = sequence_logprobs(model, [1, 2, 3, 10, 11], conts, [6], use_cache=False)
    model.config.sliding_window = 4
    with caplog.at_level("INFO", logger="character_em.judge.hf_backend"):
        windowed = sequence_logprobs(model, [1, 2, 3, 10, 11], conts, [6])
    assert "sliding window" in caplog.text and windowed == full


@pytest.mark.parametrize(("style", "attention"), [("llama", "sdpa"), ("qwen", "sdpa"), ("qwen", "eager")])
def test_cached_batched_path_matches_full_sequences_on_tiny_models(
    style: str, attention: str, tiny_model_dir: Path, tiny_qwen_model_dir: Path, tmp_path: Path
) -> None:
    folder = tiny_model_dir if style == "llama" else tiny_qwen_model_dir
    judge = HFJudge(model=str(folder), quantization="none", device="cpu", chunk_size=48)
    model, tok = judge._load()
    model.set_attn_implementation(attention)
    req = _request("alignment")
    text = tok.apply_chat_template(
        [{"role": "user", "content": req.prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]
    conts = judge._continuations(tok, "alignment", text, ids)
    # Each candidate's tokens spell exactly that candidate after the prompt.
    for s, c in zip(candidate_strings("alignment"), conts, strict=True):
        assert tok.decode(c) == s
    cached = sequence_logprobs(model, ids, conts, judge._terminators, use_cache=True, chunk_size=48)
    # The full path re-runs the prompt per candidate, so compare on a subset (1-token, multi-token,
    # the longest, and an escape), with a chunk boundary crossed on the cached side above.
    pick = [0, 7, 10, 42, 99, 100, 101, 102]
    full = sequence_logprobs(model, ids, [conts[i] for i in pick], judge._terminators, use_cache=False, chunk_size=4)
    assert max(abs(cached[i] - b) for i, b in zip(pick, full, strict=True)) < 1e-4
    assert sum(math.exp(x) for x in cached) <= 1.0 + 1e-6  # disjoint complete replies
    # Through score_samples: rows stamped hf, cached, and the hash knows which weights judged.
    from test_judge import DISPOSITIONS, _samples

    stats: dict[str, Any] = {}
    df = J.score_samples(
        _samples(["Fine answer."]),
        judge_cfg={"backend": "hf", "model": str(folder)},
        metrics_by_suite={"em": ["alignment", "coherence"]},
        dispositions=DISPOSITIONS,
        cache_dir=str(tmp_path),
        stats=stats,
        backend=judge,
    )
    assert set(df["judge_backend"]) == {"hf"} and stats["methods"] == {"exact": 2}
    assert judge.effective_params()["fingerprint"] is not None
    assert len(list(tmp_path.rglob("*.json"))) == 2
