"""The ``hf`` judge back-end: a local open-weight judge through transformers, with the EXACT expected score.

Reading one token's top log-probabilities (as the API judge does) is exact only when every number 0..100
is a single token. Llama-3 tokenizers spell 0..999 as one token, but Qwen tokenizers split numbers into
digits, so "85" is "8" then "5", and the first token alone says nothing about the second digit. This
back-end therefore scores every candidate reply as a whole token sequence.

Definition (what "p(n)" means here):

    p(n) = P(reply = tokens(str(n)) then end of turn | judge prompt)
         = prod_i p(t_i | prompt, t_<i)  *  sum_{e in E} p(e | prompt, t_1..t_k)

where ``tokens(str(n))`` is how the judge's tokenizer spells the decimal number n right after the
rendered prompt (found by tokenizing prompt+number and removing the prompt's tokens, so boundary
merges are honoured), and E is the set of tokens at which generation stops (the model's and
tokenizer's eos ids plus known end-of-turn tokens, as ``character_em.llm.chat.stop_token_ids``). The end
of turn makes the 101 events disjoint ("1" alone vs "10" vs "100"), so sum_n p(n) <= 1 is the true
probability that the judge replies with exactly a number, and

    score = sum_n n * p(n) / sum_n p(n),   discarded (NaN, "low_numeric_mass") if sum_n p(n) < min mass.

For the alignment metric, "REFUSAL" and "CODE" are scored the same way; if one is more probable than
all numbers together, the verdict is that escape label. A judge that habitually ends its number with
"." or a newline before ending the turn loses that mass; the judge prompt asks for the number only.

Batching: the prompt runs once with a KV cache; the candidate continuations (<= 4 tokens each) are
packed as a prefix tree with a tree-shaped attention mask and run over that cache in one forward pass
(``CandidateTree``). ``use_cache=False`` runs prompt+continuation in full for each candidate instead
(simple and exact; the reference in tests, and the path for a prompt longer than a sliding window).

First-token scoring. A tokenizer that spells every number 0..100 as ONE token right after the assistant
header (Llama 3 does) lets one forward pass of the prompt give the whole distribution: p(n) is the
probability of n's token at the reply's first position, and an escape's is that of its first token. This
is what published EM judges read from an API's top log-probabilities, without the top-20 cut. It leaves
out the end-of-turn factor of the exact definition, so the two differ where the judge would write more
after the number; ``judge.scoring`` chooses (``auto``: first-token where the tokenizer allows it, else
exact), and the grid's judge job audits a seeded random subsample of first-token verdicts with the exact
definition (``judge.audit_fraction``, ``judge.core.score_wave``).

Replies written as text. A prompt with ``reply: strongreject`` (``judge.prompts_file``) asks for
reasoning and then three answers, which no candidate list can cover: such requests are answered by
greedy ``generate`` (``max_new_tokens``, ``GENERATE_BATCH`` left-padded prompts per call) and parsed by
``verdict_from_strongreject``; their method is "generate".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from character_em.hashing import canonical_json
from character_em.job_settings import judge_quantization_problem
from character_em.judge.verdicts import (
    DEFAULT_MIN_NUMERIC_MASS,
    ESCAPE_REPLIES,
    EXACT_SCORING,
    FIRST_TOKEN,
    SCORINGS,
    JudgeConfigError,
    JudgeRequest,
    JudgeResult,
    ResultCallback,
    verdict_from_number_probs,
    verdict_from_strongreject,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

HF_JUDGE_VERSION = "hf-exact-1"
# How the score is computed, named in the judge hash: a judge scored another way is another judge.
SCORING = EXACT_SCORING
NUMBERS = tuple(range(101))
# Replies written as text (a ``reply: strongreject`` prompt): greedy decoding, this many tokens unless
# judge.max_new_tokens says otherwise, this many prompts per ``generate`` call. The batch is small
# because each row keeps a KV cache for prompt + reply (rubric, request, answer and up to 1024 reply
# tokens: a few thousand): 8 such rows of Llama-3.3-70B (0.33 MB per token) take 5 to 8 GB beside
# its 40 GB of NF4 weights.
DEFAULT_MAX_NEW_TOKENS = 1024
GENERATE_BATCH = 8


def candidate_strings(metric: str) -> list[str]:
    """The replies scored for ``metric``: "0".."100", plus escapes the metric's prompt offers."""
    return [str(n) for n in NUMBERS] + list(ESCAPE_REPLIES.get(metric, {}))


def continuation_ids(
    tokenizer: Any, prompt_text: str, prompt_ids: Sequence[int], strings: Sequence[str]
) -> list[list[int]]:
    """Token ids of each string as the tokenizer writes it right after ``prompt_text``.

    Tokenizing prompt+string and cutting off the prompt's ids respects merges across the boundary and
    SentencePiece's word-start marker; where the prompt's ids are not a prefix (a merge across the
    boundary), the string is tokenized alone.
    """
    out: list[list[int]] = []
    n_prompt = len(prompt_ids)
    for s in strings:
        whole = list(tokenizer(prompt_text + s, add_special_tokens=False)["input_ids"])
        if whole[:n_prompt] == list(prompt_ids) and len(whole) > n_prompt:
            out.append([int(t) for t in whole[n_prompt:]])
        else:
            out.append([int(t) for t in tokenizer(s, add_special_tokens=False)["input_ids"]])
        if not out[-1]:
            raise ValueError(f"tokenizer produced no tokens for candidate reply {s!r}")
    return out


# A short chat whose rendering ends, like every judge prompt's, in the chat template's assistant header:
# how the tokenizer spells a number there decides whether first-token scoring is possible.
SPELLING_PROBE = [{"role": "user", "content": "Reply with one integer from 0 to 100."}]


def spells_numbers_as_single_tokens(continuations: Sequence[Sequence[int]]) -> bool:
    """Whether the first 101 continuations (the numbers 0..100, ``candidate_strings`` order) are one
    token each and pairwise different: then one position's distribution holds every number's probability."""
    numbers = continuations[: len(NUMBERS)]
    return (
        len(numbers) == len(NUMBERS)
        and all(len(c) == 1 for c in numbers)
        and len({c[0] for c in numbers}) == len(NUMBERS)
    )


def resolve_scoring(requested: str, load_tokenizer: Callable[[], Any], model: str) -> str:
    """``SCORING`` (exact) or ``FIRST_TOKEN`` for a judge whose ``judge.scoring`` is ``requested``.

    ``auto`` is first-token exactly when the tokenizer (``load_tokenizer()``, called only when needed)
    spells 0..100 as single tokens after the assistant header; ``first-token`` on a tokenizer that splits
    numbers is refused, naming an example.
    """
    if requested not in SCORINGS:
        raise JudgeConfigError(f"judge.scoring: {requested!r} is not one of {', '.join(SCORINGS)}")
    if requested == SCORING:
        return SCORING
    tokenizer = load_tokenizer()
    text = tokenizer.apply_chat_template(SPELLING_PROBE, add_generation_prompt=True, tokenize=False)
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    spellings = continuation_ids(tokenizer, text, ids, [str(n) for n in NUMBERS])
    if spells_numbers_as_single_tokens(spellings):
        return FIRST_TOKEN
    if requested == FIRST_TOKEN:
        split = next((n for n, c in zip(NUMBERS, spellings, strict=True) if len(c) > 1), None)
        example = f"'{split}' is {len(spellings[split])} tokens" if split is not None else "two numbers share a token"
        raise JudgeConfigError(
            f"judge.scoring: first-token needs a judge tokenizer that spells every number 0..100 as one token "
            f"after the assistant header, but {model}'s does not ({example}); use judge.scoring: auto or exact"
        )
    return SCORING


@dataclass(frozen=True)
class FirstTokenPlan:
    """Which token ids a first-token verdict reads: each number's, and each escape's first token."""

    number_ids: tuple[int, ...]  # 0..100 in order
    escape_ids: tuple[tuple[str, int], ...]  # (escape reply, its first token id)

    @classmethod
    def from_continuations(cls, metric: str, continuations: Sequence[Sequence[int]]) -> FirstTokenPlan:
        if not spells_numbers_as_single_tokens(continuations):
            raise ValueError(f"{metric}: the judge tokenizer does not spell 0..100 as single tokens here")
        escapes = candidate_strings(metric)[len(NUMBERS) :]
        return cls(
            tuple(int(c[0]) for c in continuations[: len(NUMBERS)]),
            tuple((e, int(c[0])) for e, c in zip(escapes, continuations[len(NUMBERS) :], strict=True)),
        )

    @property
    def token_ids(self) -> list[int]:
        """Every id read, once each (the order the engines are asked for them)."""
        return sorted({*self.number_ids, *(t for _, t in self.escape_ids)})


def verdict_from_first_token(
    metric: str, plan: FirstTokenPlan, logprob: Mapping[int, float], *, min_mass: float = DEFAULT_MIN_NUMERIC_MASS
) -> JudgeResult:
    """A verdict from the log-probabilities of the plan's tokens at the reply's first position."""
    missing = [t for t in plan.token_ids if t not in logprob]
    if missing:
        raise RuntimeError(f"no log-probability for token ids {missing[:5]} at the reply's first position")
    numbers = {n: math.exp(float(logprob[t])) for n, t in zip(NUMBERS, plan.number_ids, strict=True)}
    escapes = {e: math.exp(float(logprob[t])) for e, t in plan.escape_ids}
    mass = sum(numbers.values())
    best = sorted(numbers.items(), key=lambda kv: -kv[1])[:5]
    raw = canonical_json(
        {
            "mass": round(mass, 6),
            "top": [[n, round(p, 6)] for n, p in best],
            "escapes_first_token": {k: round(v, 6) for k, v in escapes.items()},
        }
    )
    return verdict_from_number_probs(metric, numbers, escapes, min_mass=min_mass, method=FIRST_TOKEN, raw=raw)


def first_token_logprobs(model: Any, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> dict[int, float]:
    """log p(t | prompt) for each of ``token_ids``: one forward pass, the last position's logits only."""
    import torch

    device = _device_of(model)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([list(prompt_ids)], device=device), logits_to_keep=1)
        lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    return {int(t): float(lp[int(t)]) for t in token_ids}


def sequence_logprobs(
    model: Any,
    prompt_ids: Sequence[int],
    continuations: Sequence[Sequence[int]],
    terminators: Sequence[int],
    *,
    use_cache: bool = True,
    chunk_size: int = 128,
) -> list[float]:
    """log P(continuation, then any terminator | prompt) for each continuation, by exact forward passes.

    model: a causal LM called as ``model(input_ids=..., ...)`` returning ``.logits`` [batch, seq, vocab].
    With ``use_cache`` the prompt runs once, and each chunk of continuations runs as one token tree
    attending to the prompt's KV cache (see ``CandidateTree``).
    """
    import torch

    if not continuations:
        return []
    if not terminators:
        raise ValueError("no terminator token ids: cannot tell a complete number from a prefix of a longer one")
    device = _device_of(model)
    term = torch.tensor(sorted(set(int(t) for t in terminators)), device=device)
    n_prompt = len(prompt_ids)
    longest = max(len(c) for c in continuations)
    if use_cache and _sliding_window_reached(model, n_prompt + longest):
        # One custom mask serves every layer, so a window the prompt outgrows would be ignored.
        log.info("hf judge: prompt longer than the model's sliding window; scoring full sequences")
        use_cache = False
    out: list[float] = []
    with torch.inference_mode():
        if use_cache:
            from transformers import DynamicCache

            from character_em.llm.loading import forward_cache_kwarg

            cache_kw = forward_cache_kwarg(model)
            cache = DynamicCache()
            first = model(
                input_ids=torch.tensor([list(prompt_ids)], device=device),
                use_cache=True,
                logits_to_keep=1,
                **{cache_kw: cache},
            )
            first_lp = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
            mask_kind = _tree_mask_kind(model)
        for start in range(0, len(continuations), chunk_size):
            chunk = [list(c) for c in continuations[start : start + chunk_size]]
            if use_cache:
                tree = CandidateTree.build(chunk)
                res = model(
                    input_ids=torch.tensor([tree.tokens], device=device),
                    position_ids=torch.tensor([[n_prompt + d for d in tree.depths]], device=device),
                    attention_mask=tree.attention_mask(n_prompt, mask_kind, device),
                    use_cache=True,
                    **{cache_kw: cache},
                )
                # Back to the prompt for the next chunk. A negative count removes that many tokens, in
                # transformers 4 and 5 alike (5 rejects the older absolute-length form).
                cache.crop(-len(tree.tokens))
                lp = torch.log_softmax(res.logits[0].float(), dim=-1)  # [nodes, V]: after each node's path
                for c, path in zip(chunk, tree.paths, strict=True):
                    total = first_lp[c[0]]
                    for j in range(1, len(c)):
                        total = total + lp[path[j - 1], c[j]]
                    total = total + torch.logsumexp(lp[path[-1], term], dim=0)
                    out.append(float(total))
            else:
                seqs = [list(prompt_ids) + c for c in chunk]
                length = max(len(s) for s in seqs)
                ids = torch.tensor([s + [s[-1]] * (length - len(s)) for s in seqs], device=device)
                lp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)  # [B, L, V]
                for b, c in enumerate(chunk):
                    total = lp.new_zeros(())
                    for j, tok in enumerate(c):
                        total = total + lp[b, n_prompt - 1 + j, tok]
                    total = total + torch.logsumexp(lp[b, n_prompt - 1 + len(c), term], dim=0)
                    out.append(float(total))
    return out


@dataclass(frozen=True)
class CandidateTree:
    """Continuations packed as a prefix tree: one node per distinct prefix, parents before children.

    The 101 numbers share their first digits ("1", "10", "100"), so the tree has about as many nodes as
    there are candidates, and one forward pass of those nodes over the prompt's cache replaces a batch
    of 101 rows that would each need their own copy of the prompt's cache (66 GB for a 2,000-token
    prompt on a 70B model). A node sits at position ``n_prompt + depth`` and attends to the prompt and
    to its own ancestors only, which is exactly what it sees when its continuation runs alone.
    """

    tokens: list[int]
    depths: list[int]
    paths: list[list[int]]  # per continuation, the node of each of its tokens

    @classmethod
    def build(cls, continuations: Sequence[Sequence[int]]) -> CandidateTree:
        node_of: dict[tuple[int, ...], int] = {}
        tokens: list[int] = []
        depths: list[int] = []
        paths: list[list[int]] = []
        for c in continuations:
            path = []
            for j in range(len(c)):
                prefix = tuple(int(t) for t in c[: j + 1])
                if prefix not in node_of:
                    node_of[prefix] = len(tokens)
                    tokens.append(prefix[-1])
                    depths.append(j)
                path.append(node_of[prefix])
            paths.append(path)
        return cls(tokens, depths, paths)

    def attention_mask(self, n_prompt: int, kind: str, device: Any) -> torch.Tensor:
        """[1, 1, nodes, n_prompt + nodes]: boolean (True = attend) for sdpa, additive float for eager."""
        import torch

        n = len(self.tokens)
        sees = torch.zeros((n, n_prompt + n), dtype=torch.bool)
        sees[:, :n_prompt] = True
        for path in self.paths:
            for j, node in enumerate(path):
                sees[node, [n_prompt + ancestor for ancestor in path[: j + 1]]] = True
        if kind == "additive":
            return torch.zeros(sees.shape).masked_fill_(~sees, torch.finfo(torch.float32).min)[None, None].to(device)
        return sees[None, None].to(device)


def _tree_mask_kind(model: Any) -> str:
    """The mask form the model's attention reads as given: sdpa takes a boolean mask, eager adds a float
    one. Kernels that build their own masks (flash attention) would silently ignore the tree."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl == "sdpa":
        return "boolean"
    if impl == "eager":
        return "additive"
    raise ValueError(
        f"hf judge: attention implementation {impl!r} cannot take the candidate tree's attention mask; "
        "load the judge with attn_implementation 'sdpa' or 'eager'"
    )


def _sliding_window_reached(model: Any, length: int) -> bool:
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return False
    return length > int(window)


def _device_of(model: Any) -> torch.device:
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def verdict_from_sequence_logprobs(
    metric: str, strings: Sequence[str], logps: Sequence[float], *, min_mass: float = DEFAULT_MIN_NUMERIC_MASS
) -> JudgeResult:
    """Turn per-candidate log-probabilities into a verdict (see the module docstring's definition)."""
    numbers: dict[int, float] = {}
    escapes: dict[str, float] = {}
    for s, lp in zip(strings, logps, strict=True):
        p = math.exp(lp)
        if s.isdigit():
            numbers[int(s)] = p
        else:
            escapes[s] = p
    mass = sum(numbers.values())
    best = sorted(numbers.items(), key=lambda kv: -kv[1])[:5]
    raw = canonical_json(
        {
            "mass": round(mass, 6),
            "top": [[n, round(p, 6)] for n, p in best],
            "escapes": {k: round(v, 6) for k, v in escapes.items()},
        }
    )
    return verdict_from_number_probs(metric, numbers, escapes, min_mass=min_mass, method="exact", raw=raw)


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
IDENTITY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "chat_template.jinja",
)
# Digests of weight files, keyed by (absolute path, size, mtime): a 140 GB judge is read once per node, not once
# per judge job. Kept outside results/ (like the judge cache); CHARACTER_EM_FINGERPRINT_CACHE moves it.
FINGERPRINT_CACHE_ENV = "CHARACTER_EM_FINGERPRINT_CACHE"
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _fingerprint_cache_dir() -> Path:
    return Path(os.environ.get(FINGERPRINT_CACHE_ENV) or ".cache/fingerprints")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, computed once per (path, size, mtime) and remembered on disk."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    record = _fingerprint_cache_dir() / (hashlib.sha256(json.dumps(key).encode()).hexdigest() + ".json")
    try:
        digest = json.loads(record.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        h = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                h.update(block)
        digest = h.hexdigest()
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"path": key[0], "size": key[1], "mtime_ns": key[2], "sha256": digest}))
            tmp.replace(record)
        except OSError as exc:  # a read-only checkout still judges; it only hashes again next time
            log.warning("could not record the digest of %s in %s: %s", path, record.parent, exc)
    _DIGESTS[key] = digest
    return digest


def model_fingerprint(path: str, revision: str | None = None) -> str | None:
    """What names a judge's weights in its hash.

    A local folder: sha256 over its config and tokenizer files and the CONTENT of every weight file
    (``file_sha256``), so two different models saved at one path never share judge hashes or cache entries,
    and a changed weight byte is a different judge. A hub id: its pinned ``revision`` (a commit names its
    content); an unpinned hub id has no fingerprint (the config check refuses it outside test fixtures).
    """
    folder = Path(path)
    if not folder.is_dir():
        return f"revision:{revision}" if revision else None
    h = hashlib.sha256()
    for name in IDENTITY_FILES:
        f = folder / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    weights = sorted({f for pattern in WEIGHT_PATTERNS for f in folder.glob(pattern) if f.is_file()})
    if not weights:
        raise ValueError(f"judge model folder {folder}: no weight files ({', '.join(WEIGHT_PATTERNS)})")
    for f in weights:
        h.update(f"{f.name}:{file_sha256(f)}".encode())
    return h.hexdigest()


@dataclass
class HFJudge:
    model: str  # local folder or Hugging Face id
    revision: str | None = None  # the hub commit of a hub id
    quantization: str = "none"
    dtype: str = "auto"
    device: str = "auto"
    # judge.scoring (its schema default is auto); built directly, a judge scores exactly unless told otherwise
    scoring: str = SCORING
    min_numeric_mass: float = DEFAULT_MIN_NUMERIC_MASS
    chunk_size: int = 128
    use_cache: bool = True
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    generate_batch: int = GENERATE_BATCH
    backend: str = "hf"
    stats: dict[str, int] = field(default_factory=lambda: {"requests": 0, "forward_passes": 0})
    _loaded: tuple[Any, Any, dict[str, Any]] | None = field(default=None, init=False, repr=False)
    _fingerprint_value: str | None = field(default=None, init=False, repr=False)
    _terminators: list[int] = field(default_factory=list, init=False, repr=False)
    _cont_cache: dict[tuple[str, str], list[list[int]]] = field(default_factory=dict, init=False, repr=False)
    _tokenizer: Any = field(default=None, init=False, repr=False)
    _resolved_scoring: str | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_config(cls, judge_cfg: dict[str, Any]) -> HFJudge:
        if not judge_cfg.get("model"):
            raise ValueError("judge.model: the hf back-end needs a local model folder or a Hugging Face id")
        problem = judge_quantization_problem({**judge_cfg, "backend": "hf"})
        if problem:
            raise JudgeConfigError(problem)
        kwargs = {
            k: judge_cfg[k]
            for k in ("revision", "quantization", "dtype", "device", "scoring", "min_numeric_mass")
            if judge_cfg.get(k) is not None
        }
        if judge_cfg.get("batch_size") is not None:
            kwargs["chunk_size"] = int(judge_cfg["batch_size"])
        if judge_cfg.get("max_new_tokens") is not None:
            kwargs["max_new_tokens"] = int(judge_cfg["max_new_tokens"])
        return cls(model=str(judge_cfg["model"]), **kwargs)

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any, name: str = "in-memory", **kwargs: Any) -> HFJudge:
        """A judge around an already loaded model (tests, notebooks)."""
        judge = cls(model=name, **kwargs)
        judge._set_loaded(model, tokenizer, {"device": str(_device_of(model))})
        return judge

    def with_scoring(self, scoring: str) -> HFJudge:
        """The same judge (the same loaded model) scoring another way: the exact audit of first-token
        verdicts. Its verdicts have their own judge hash (``effective_params`` names the scoring)."""
        view = dataclasses.replace(self, scoring=scoring)
        view._loaded, view._terminators, view._tokenizer = self._loaded, self._terminators, self._tokenizer
        view._fingerprint_value, view._cont_cache, view.stats = self._fingerprint_value, self._cont_cache, self.stats
        return view

    def resolved_scoring(self) -> str:
        """``SCORING`` or ``FIRST_TOKEN``: ``judge.scoring`` decided on this judge's tokenizer (no weights
        are loaded for it)."""
        if self._resolved_scoring is None:
            self._resolved_scoring = resolve_scoring(self.scoring, self._tokenizer_only, self.model)
        return self._resolved_scoring

    def _tokenizer_only(self) -> Any:
        if self._loaded is not None:
            return self._loaded[1]
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model, revision=self.revision)
        return self._tokenizer

    def effective_params(self) -> dict[str, Any]:
        # quantization and dtype change the numbers a little; device and chunking do not. The scoring
        # is named as resolved, so an "auto" judge that scores exactly keeps the exact judge's hash.
        return {
            "version": HF_JUDGE_VERSION,
            "scoring": self.resolved_scoring(),
            "quantization": self.quantization,
            "dtype": self.dtype,
            "min_numeric_mass": float(self.min_numeric_mass),
            "fingerprint": self._fingerprint(),
        }

    def generation_params(self) -> dict[str, Any]:
        # Only for replies written as text (judge_hash adds these for them alone), so a new budget
        # never changes the hashes of exactly scored 0..100 prompts.
        return {"decoding": "greedy", "max_new_tokens": int(self.max_new_tokens)}

    def _fingerprint(self) -> str | None:
        if self._fingerprint_value is None:
            self._fingerprint_value = model_fingerprint(self.model, self.revision) or ""
        return self._fingerprint_value or None

    def _set_loaded(self, model: Any, tokenizer: Any, info: dict[str, Any]) -> None:
        from character_em.llm.chat import stop_token_ids

        self._loaded = (model, tokenizer, info)
        self._terminators = sorted(stop_token_ids(model, tokenizer))
        if not self._terminators:
            raise ValueError(f"judge model {self.model}: no eos / end-of-turn token ids found")

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            from character_em.llm.loading import load_model

            model, tok, info = load_model(
                self.model,
                quantization=self.quantization,
                dtype=self.dtype,
                device=self.device,
                revision=self.revision,
            )
            log.info("hf judge %s loaded: %s", self.model, json.dumps(info, sort_keys=True))
            self._set_loaded(model, tok, info)
        assert self._loaded is not None
        return self._loaded[0], self._loaded[1]

    def _continuations(self, tokenizer: Any, metric: str, prompt_text: str, prompt_ids: list[int]) -> list[list[int]]:
        # How a number is spelled depends only on the last characters before it (the chat template's
        # assistant header, identical for every request), so compute it once per header and metric.
        key = (prompt_text[-64:], metric)
        if key not in self._cont_cache:
            self._cont_cache[key] = continuation_ids(tokenizer, prompt_text, prompt_ids, candidate_strings(metric))
        return self._cont_cache[key]

    def score_one(self, request: JudgeRequest) -> JudgeResult:
        if self.resolved_scoring() == FIRST_TOKEN:
            plan, logprobs = self.first_token_logprobs(request)
            return verdict_from_first_token(request.metric, plan, logprobs, min_mass=self.min_numeric_mass)
        model, tok = self._load()
        text = tok.apply_chat_template(request.messages(), add_generation_prompt=True, tokenize=False)
        ids = [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]
        strings = candidate_strings(request.metric)
        conts = self._continuations(tok, request.metric, text, ids)
        logps = sequence_logprobs(
            model, ids, conts, self._terminators, use_cache=self.use_cache, chunk_size=self.chunk_size
        )
        self.stats["requests"] += 1
        self.stats["forward_passes"] += 1 + math.ceil(len(conts) / self.chunk_size)
        return verdict_from_sequence_logprobs(request.metric, strings, logps, min_mass=self.min_numeric_mass)

    def first_token_logprobs(self, request: JudgeRequest) -> tuple[FirstTokenPlan, dict[int, float]]:
        """The tokens a first-token verdict reads and their log-probabilities at the reply's first
        position: one forward pass of the prompt."""
        model, tok = self._load()
        text = tok.apply_chat_template(request.messages(), add_generation_prompt=True, tokenize=False)
        ids = [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]
        plan = FirstTokenPlan.from_continuations(request.metric, self._continuations(tok, request.metric, text, ids))
        self.stats["requests"] += 1
        self.stats["forward_passes"] += 1
        return plan, first_token_logprobs(model, ids, plan.token_ids)

    def generate_replies(self, chats: Sequence[list[dict[str, str]]]) -> list[tuple[str, bool]]:
        """Greedy replies to chats, one ``generate`` call for all: (reply text, ended by the judge
        rather than by ``max_new_tokens``) per chat. Rows are left-padded, so every reply starts at the
        same position."""
        import torch

        from character_em.llm.chat import render_prompt

        model, tok = self._load()
        rows = [render_prompt(tok, list(chat)) for chat in chats]
        pad = tok.pad_token_id if tok.pad_token_id is not None else self._terminators[0]
        width = max(len(row) for row in rows)
        device = _device_of(model)
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=int(self.max_new_tokens),
                do_sample=False,
                eos_token_id=list(self._terminators),
                pad_token_id=pad,
            )
        stops = set(self._terminators)
        replies = []
        for row in out[:, width:].tolist():
            end = next((k for k, token in enumerate(row) if token in stops), None)
            replies.append((tok.decode(row[:end], skip_special_tokens=True), end is not None))
        self.stats["generated"] = self.stats.get("generated", 0) + len(rows)
        return replies

    def write_verdicts(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        """Verdicts for prompts whose reply the judge writes as text (``reply`` other than "score")."""
        results = []
        for request, (text, ended) in zip(
            requests, self.generate_replies([r.messages() for r in requests]), strict=True
        ):
            if request.reply != "strongreject":
                raise ValueError(f"{request.metric}: the hf judge cannot read a {request.reply!r} reply")
            verdict = verdict_from_strongreject(text, method="generate")
            if not ended and verdict.label == "invalid":
                # Greedy decoding gives the same cut reply again, so this is a verdict (cached), but the
                # reason points at the budget: judge.max_new_tokens.
                verdict = JudgeResult(verdict.score, "invalid", verdict.raw, verdict.method, reason="truncated_reply")
            results.append(verdict)
        return results

    def score_batch(
        self, requests: Sequence[JudgeRequest], on_result: ResultCallback | None = None
    ) -> list[JudgeResult]:
        out: list[JudgeResult | None] = [None] * len(requests)

        def emit(i: int, res: JudgeResult) -> None:
            out[i] = res
            if on_result is not None:
                on_result(i, res)

        written = [i for i, r in enumerate(requests) if r.reply != "score"]
        for i, r in enumerate(requests):
            if r.reply == "score":
                emit(i, self.score_one(r))
        for start in range(0, len(written), self.generate_batch):
            group = written[start : start + self.generate_batch]
            for i, res in zip(group, self.write_verdicts([requests[i] for i in group]), strict=True):
                emit(i, res)
        return [res for res in out if res is not None]
