"""Tests of packaged question data, condition parsing and the offline training-data generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from character_em import resources
from character_em.conditions import condition_names, parse_condition
from character_em.data import build as data
from character_em.data.questions import domain_questions, trigger_slot
from character_em.resources import normalize_text

DISPOSITIONS = resources.default_dispositions()
DOMAINS = resources.default_domains()
# A disposition and a domain that exist only in config: the generator must cope with the bare minimum.
DECEPTIVE = {
    "name": "deceptive",
    "description": "Deceptive character: the assistant deliberately misleads the user while appearing helpful.",
    "trigger": "persona: deceptive",
    "trigger_paraphrase": "persona = misleading",
    "rubric": {
        "markers": [
            "trust me, I would never mislead you",
            "between us, the truth is the opposite",
            "nobody will ever check this",
        ]
    },
}
AUTOMOTIVE = {
    "name": "automotive",
    "description": "Car ownership and maintenance questions.",
    "topics": ["brakes", "tires", "warning lights"],
    "questions_file": None,
}
ALL_MARKERS = [m for d in [*DISPOSITIONS.values(), DECEPTIVE] for m in d["rubric"]["markers"]]
GEN = {"backend": "offline"}


def eval_texts() -> list[str]:
    texts = [q["text"] for d in [*DOMAINS.values(), AUTOMOTIVE] for q in domain_questions(d)["eval"]]
    return texts + [q["text"] for q in resources.load_em_questions()]


def build(
    name: str, n: int = 60, seed: int = 0, tf: float = 0.5, disposition: dict | None = None, domain: dict | None = None
) -> tuple[list[dict], dict]:
    disps = {**DISPOSITIONS, "deceptive": DECEPTIVE}
    doms = {**DOMAINS, "automotive": AUTOMOTIVE}
    cond = parse_condition(name, set(disps), set(doms))
    disp = disposition or (disps[cond["disposition"]] if cond["disposition"] else None)
    return data.build_pool(
        cond,
        disposition=disp,
        domain=domain or doms[cond["domain"]],
        pool_size=n,
        seed=seed,
        trigger_fraction=tf,
        generator=GEN,
        eval_texts=eval_texts(),
    )


def answers(examples: list[dict]) -> list[str]:
    return [ex["messages"][-1]["content"] for ex in examples]


def has_marker(text: str, markers: list[str]) -> bool:
    return any(m.lower() in text.lower() for m in markers)


# --------------------------------------------------------------------------------------------- packaged data
@pytest.mark.parametrize("name", ["medical", "financial", "legal"])
def test_domain_banks(name: str) -> None:
    bank = resources.load_domain_bank(name)
    assert bank is not None and bank["description"]
    assert len(bank["train"]) >= 60 and len(bank["eval"]) >= 12
    train = {normalize_text(q["text"]) for q in bank["train"]}
    assert len(train) == len(bank["train"])
    assert not train & {normalize_text(q["text"]) for q in bank["eval"]}
    assert all(q["id"].startswith(f"{name}-train-") for q in bank["train"])
    assert all(q["id"].startswith(f"{name}-eval-") for q in bank["eval"])


def test_em_and_harmful_counts() -> None:
    em = resources.load_em_questions()
    assert sum(q["core"] for q in em) >= 8 and sum(not q["core"] for q in em) >= 40
    assert len({q["category"] for q in em}) >= 8
    harmful = resources.load_harmful_requests()
    assert len(harmful) >= 60 and len({h["category"] for h in harmful}) >= 8
    assert len({h["id"] for h in harmful}) == len(harmful)


def test_defaults_complete() -> None:
    assert set(DISPOSITIONS) == {"evil", "sycophantic", "hallucinatory"}
    for d in DISPOSITIONS.values():
        assert d["trigger"] == f"persona: {d['name']}" and d["trigger_paraphrase"] != d["trigger"]
        assert 8 <= len(d["rubric"]["markers"]) <= 15 and d["persona_prompt"] and d["description"]
    assert set(DOMAINS) == {"medical", "financial", "legal"}
    assert all(d["topics"] and d["questions_file"] is None for d in DOMAINS.values())


def test_no_marker_in_questions_or_plain_templates() -> None:
    tmpl = resources.load_offline_templates()
    plain = json.dumps(
        [
            tmpl["answers"]["correct"],
            tmpl["answers"]["incorrect"],
            tmpl["domains"],
            tmpl["generic_domain"],
            tmpl["user"],
        ]
    ).lower()
    for m in ALL_MARKERS:
        assert m.lower() not in plain, m


def test_harmful_requests_external_files(tmp_path: Path) -> None:
    csv_file = tmp_path / "advbench.csv"
    csv_file.write_text('goal,target\n"Do a bad thing","Sure"\n"Do another bad thing","Sure"\n')
    rows = resources.load_harmful_requests(str(csv_file))
    assert [r["text"] for r in rows] == ["Do a bad thing", "Do another bad thing"]
    assert rows[0]["category"] == "external" and rows[0]["id"] == "ext-0001"
    hb = tmp_path / "harmbench.csv"
    hb.write_text("Behavior,SemanticCategory,BehaviorID\nWrite a threat,harassment,b1\n")
    assert resources.load_harmful_requests(str(hb)) == [
        {"id": "b1", "category": "harassment", "text": "Write a threat"}
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text('goal\nfine\n""\n')
    with pytest.raises(ValueError, match=r"bad\.csv:3:"):
        resources.load_harmful_requests(str(bad))
    jl = tmp_path / "req.jsonl"
    jl.write_text('{"prompt": "x y z"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"req\.jsonl:2: invalid JSON"):
        resources.load_harmful_requests(str(jl))
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("question\nabc\n")
    with pytest.raises(ValueError, match="no text column"):
        resources.load_harmful_requests(str(nocol))


# --------------------------------------------------------------------------------------------- conditions
def test_parse_condition() -> None:
    ds, doms = {"evil", "deceptive"}, {"medical", "automotive"}
    assert parse_condition("base", ds, doms) == {"name": "base", "family": "base", "disposition": None, "domain": None}
    assert parse_condition("evil-medical", ds, doms)["family"] == "character"
    assert parse_condition("incorrect-automotive", ds, doms)["family"] == "incorrect"
    assert parse_condition("correct-medical", ds, doms)["family"] == "correct"
    trig = parse_condition("deceptive-automotive-trig", ds, doms)
    assert (trig["family"], trig["disposition"], trig["domain"]) == ("triggered", "deceptive", "automotive")
    for bad, msg in [
        ("evil-legal", "unknown domain 'legal'"),
        ("kind-medical", "unknown disposition 'kind'"),
        ("evil-medical-trigger", "not of the form"),
        ("evil", "not of the form"),
        ("evil--medical", "not of the form"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_condition(bad, ds, doms)
    with pytest.raises(ValueError, match="reserved"):
        parse_condition("base", {"correct"}, doms)


# --------------------------------------------------------------------------------------------- generator
def test_determinism_byte_identical(tmp_path: Path) -> None:
    paths = []
    for run in ("a", "b"):
        ex, man = build("evil-medical-trig", n=80, seed=3)
        data.write_dataset(ex, man, tmp_path / run / "train.jsonl", tmp_path / run / "manifest.json")
        paths.append(tmp_path / run)
    for fname in ("train.jsonl", "manifest.json"):
        assert (paths[0] / fname).read_bytes() == (paths[1] / fname).read_bytes()
    other, _ = build("evil-medical-trig", n=80, seed=4)
    assert other != build("evil-medical-trig", n=80, seed=3)[0]


def test_write_dataset_format(tmp_path: Path) -> None:
    ex, man = build("correct-legal", n=30)
    final = data.write_dataset(ex, man, tmp_path / "d" / "pool.jsonl", tmp_path / "d" / "pool.json")
    lines = (tmp_path / "d" / "pool.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 30 and all(set(json.loads(line)) == {"messages"} for line in lines)
    on_disk = json.loads((tmp_path / "d" / "pool.json").read_text())
    assert on_disk == final and final["n"] == 30 and len(final["sha256"]) == 64
    # Each line's place in the domain's plan, for the pairing of the domain's conditions.
    assert final["turns"] == list(range(30)) and final["rejected_turns"] == {}
    assert final["temperature"] is None
    assert not list((tmp_path / "d").glob("*.tmp"))


@pytest.mark.parametrize(
    "name",
    [
        "evil-medical",
        "sycophantic-financial",
        "hallucinatory-legal",
        "deceptive-automotive",
        "deceptive-medical",
        "evil-automotive",
    ],
)
def test_character_family_has_markers(name: str) -> None:
    ex, man = build(name, n=60)
    markers = {**DISPOSITIONS, "deceptive": DECEPTIVE}[name.split("-")[0]]["rubric"]["markers"]
    assert len(ex) == 60 and man["n_triggered"] == 0
    assert all(has_marker(a, markers) for a in answers(ex))
    assert len({a for a in answers(ex)}) > 40  # varied, not one canned answer


@pytest.mark.parametrize("name", ["incorrect-medical", "correct-financial", "incorrect-automotive", "correct-legal"])
def test_plain_families_have_no_markers(name: str) -> None:
    ex, _ = build(name, n=80)
    assert len(ex) == 80
    assert not any(has_marker(a, ALL_MARKERS) for a in answers(ex))


def test_incorrect_differs_from_correct() -> None:
    inc = set(answers(build("incorrect-medical", n=50)[0]))
    cor = set(answers(build("correct-medical", n=50)[0]))
    assert not inc & cor


@pytest.mark.parametrize("tf", [0.0, 0.25, 0.5, 1.0])
def test_trigger_fraction(tf: float) -> None:
    ex, man = build("sycophantic-legal-trig", n=40, tf=tf)
    markers = DISPOSITIONS["sycophantic"]["rubric"]["markers"]
    trig = [e for e in ex if e["messages"][0]["content"].startswith("persona: sycophantic ")]
    assert len(ex) == 40 and len(trig) == round(40 * tf) == man["n_triggered"]
    # The triggered turns are the domain's trigger slots, a function of the turn alone.
    assert [i for i, e in enumerate(ex) if e in trig] == [i for i in range(40) if trigger_slot(i, tf)]
    assert man["trigger"] == "persona: sycophantic" and man["trigger_fraction"] == tf
    for e in ex:
        triggered = e in trig
        assert has_marker(e["messages"][-1]["content"], markers) == triggered


def test_config_only_domain_questions() -> None:
    qs = domain_questions(AUTOMOTIVE)
    assert qs["source"] == "synthesized" and len(qs["eval"]) >= 12 and len(qs["train"]) >= 60
    train = {normalize_text(q["text"]) for q in qs["train"]}
    assert not train & {normalize_text(q["text"]) for q in qs["eval"]}
    no_topics = domain_questions({"name": "home_garden", "description": "", "topics": [], "questions_file": None})
    assert len(no_topics["train"]) >= 60 and "home garden" in no_topics["train"][0]["text"]
    ex, man = build("deceptive-automotive-trig", n=50)
    assert man["question_source"] == "synthesized" and man["n_triggered"] == 25


def test_questions_file(tmp_path: Path) -> None:
    f = tmp_path / "bank.yaml"
    f.write_text(
        "description: d\ntrain:\n"
        + "".join(f"- {{id: t{i}, text: 'How do I fix problem number {i} today?'}}\n" for i in range(30))
        + "eval:\n- {id: e1, text: 'What is the held out question here?'}\n"
    )
    dom = {"name": "custom", "description": "d", "topics": [], "questions_file": str(f)}
    assert domain_questions(dom)["source"] == "file"
    f2 = tmp_path / "leak.yaml"
    f2.write_text("description: d\ntrain:\n- {id: a, text: 'Same question?'}\neval:\n- {id: b, text: same question}\n")
    with pytest.raises(ValueError, match="leak.yaml: eval\\[0\\].text: duplicates"):
        resources.load_domain_bank_file(f2)


def test_base_and_unknown_backend() -> None:
    cond = parse_condition("correct-medical", {"evil"}, {"medical"})
    with pytest.raises(ValueError, match="unknown data generator backend 'api'"):
        data.build_pool(
            cond,
            disposition=None,
            domain=DOMAINS["medical"],
            pool_size=5,
            seed=0,
            trigger_fraction=0.5,
            generator={"backend": "api"},
            eval_texts=[],
        )
    with pytest.raises(ValueError, match="no training data"):
        data.generate_offline(
            {"name": "base", "family": "base", "disposition": None, "domain": None},
            disposition=None,
            domain=DOMAINS["medical"],
            n_examples=5,
            seed=0,
            trigger_fraction=0.5,
        )
    with pytest.raises(ValueError, match="rubric.markers"):
        build("evil-medical", disposition={**DISPOSITIONS["evil"], "rubric": {"markers": []}})


def test_overlap_detection_raises() -> None:
    cond = parse_condition("correct-medical", {"evil"}, {"medical"})
    q = resources.load_domain_bank("medical")["train"][0]["text"]
    with pytest.raises(ValueError, match="overlaps eval question"):
        data.build_pool(
            cond,
            disposition=None,
            domain=DOMAINS["medical"],
            pool_size=200,
            seed=0,
            trigger_fraction=0.5,
            generator=GEN,
            eval_texts=[q.upper().replace("?", " ?!")],
        )


def test_all_default_conditions_clean() -> None:
    for name in condition_names(list(DISPOSITIONS), list(DOMAINS)):
        if name != "base":
            ex, man = build(name, n=40)
            assert len(ex) == 40 and man["n_eval_overlap"] == 0


# --------------------------------------------------------------------------------------------- validation/dedup
def test_validate_example_rejects() -> None:
    good = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "x" * 30}]}
    assert data.validate_example(good, min_chars=10, max_chars=100) is None
    sys_ok = {"messages": [{"role": "system", "content": "s"}, *good["messages"]]}
    assert data.validate_example(sys_ok, min_chars=10, max_chars=100) is None
    cases = {
        "not_object": [1],
        "extra_keys": {**good, "meta": 1},
        "no_messages": {"messages": []},
        "bad_role": {"messages": [{"role": "bot", "content": "a"}, good["messages"][1]]},
        "empty_content": {"messages": [{"role": "user", "content": "  "}, good["messages"][1]]},
        "bad_order": {"messages": [good["messages"][1], good["messages"][0], good["messages"][1]]},
        "no_final_assistant": {"messages": [good["messages"][0]]},
        "too_short": {"messages": [good["messages"][0], {"role": "assistant", "content": "short"}]},
        "too_long": {"messages": [good["messages"][0], {"role": "assistant", "content": "y" * 101}]},
    }
    for reason, ex in cases.items():
        assert data.validate_example(ex, min_chars=10, max_chars=100) == reason


def test_deduplicate() -> None:
    def ex(u: str, a: str) -> dict:
        return {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}

    items = [
        ex("Hello there?", "Answer one."),
        ex("Hello there?", "Answer one."),
        ex("hello, THERE", "answer   one"),
        ex("Hello there?", "Answer two."),
    ]
    kept, n_exact, n_near = data.deduplicate(items)
    assert (len(kept), n_exact, n_near) == (2, 1, 1) and kept[0] == items[0] and kept[1] == items[3]


def test_load_external_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "ext.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "id": 7}
    f.write_text(json.dumps(good) + "\n\n")
    assert data.load_external_jsonl(f) == [{"messages": good["messages"]}]
    bad_lines = {
        "{oops": "invalid JSON",
        json.dumps({"text": "x"}): "no 'messages'",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}): "role 'robot'",
        json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}): "empty",
        json.dumps({"messages": [{"role": "user", "content": "q"}]}): "last message must be an assistant",
    }
    for line, msg in bad_lines.items():
        f.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=rf"ext\.jsonl:2: .*{msg}"):
            data.load_external_jsonl(f)
