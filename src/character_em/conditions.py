"""The condition grammar: the names of a grid's conditions, what each one means, and the trigger rule.

``base``, ``{disposition}-{domain}`` (character data), ``incorrect-{domain}``, ``correct-{domain}``,
``{disposition}-{domain}-trig`` (trigger-prefixed turns answered in character) and
``{disposition}-{domain}-matched`` (the character data subsampled to the alignment distribution of
``incorrect-{domain}``'s data; ``data.severity_matched``). Config validation, data generation, the rules and
the estimate all parse names here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "FAMILIES",
    "MATCHED_SUFFIX",
    "RESERVED_NAMES",
    "parse_condition",
    "condition_names",
    "matched_arm",
    "matched_source",
    "check_disposition",
    "is_triggered",
]

FAMILIES = ("base", "character", "incorrect", "correct", "triggered", "matched")
# The suffix of a character condition's severity-matched arm, and the family it belongs to.
MATCHED_SUFFIX = "matched"
# The condition-name suffix of each three-part family.
SUFFIX_FAMILIES = {"trig": "triggered", MATCHED_SUFFIX: "matched"}
# Words of the grammar itself, which no disposition or domain may be called.
RESERVED_NAMES = frozenset({"base", "incorrect", "correct", *SUFFIX_FAMILIES})


def parse_condition(
    name: str, dispositions: set[str] | Iterable[str], domains: set[str] | Iterable[str]
) -> dict[str, Any]:
    """Split a condition name into ``{"name", "family", "disposition", "domain"}``.

    Forms: ``base``, ``{disposition}-{domain}``, ``incorrect-{domain}``, ``correct-{domain}``,
    ``{disposition}-{domain}-trig``, ``{disposition}-{domain}-matched``. Raises ValueError naming what is
    unknown.
    """
    dispositions = set(dispositions)
    domains = set(domains)
    clash = sorted((dispositions | domains) & RESERVED_NAMES)
    if clash:
        raise ValueError(f"disposition/domain names {clash} are reserved words of condition names; rename them")
    forms = (
        "base, {disposition}-{domain}, incorrect-{domain}, correct-{domain}, {disposition}-{domain}-trig,"
        " {disposition}-{domain}-matched"
    )
    if name == "base":
        return {"name": name, "family": "base", "disposition": None, "domain": None}
    parts = name.split("-")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in SUFFIX_FAMILIES) or not all(parts):
        raise ValueError(f"condition {name!r} is not of the form {forms}")
    head, domain = parts[0], parts[1]
    if domain not in domains:
        raise ValueError(
            f"condition {name!r}: unknown domain {domain!r} (known: {', '.join(sorted(domains)) or 'none'})"
        )
    if len(parts) == 2 and head in ("incorrect", "correct"):
        return {"name": name, "family": head, "disposition": None, "domain": domain}
    if head not in dispositions:
        known = ", ".join(sorted(dispositions)) or "none"
        raise ValueError(f"condition {name!r}: unknown disposition {head!r} (known: {known}; or incorrect/correct)")
    family = SUFFIX_FAMILIES[parts[2]] if len(parts) == 3 else "character"
    return {"name": name, "family": family, "disposition": head, "domain": domain}


def matched_arm(character: str) -> str:
    """The severity-matched arm of a character condition: ``evil-medical`` -> ``evil-medical-matched``."""
    return f"{character}-{MATCHED_SUFFIX}"


def matched_source(condition: dict[str, Any]) -> dict[str, str]:
    """The two conditions a parsed ``-matched`` condition's data comes from: ``{"character":
    "{disposition}-{domain}", "incorrect": "incorrect-{domain}"}``."""
    if condition["family"] != "matched":
        raise ValueError(
            f"condition {condition['name']!r} is not a severity-matched arm (family {condition['family']})"
        )
    return {
        "character": f"{condition['disposition']}-{condition['domain']}",
        "incorrect": f"incorrect-{condition['domain']}",
    }


def condition_names(dispositions: Sequence[str], domains: Sequence[str], *, triggered: bool = True) -> list[str]:
    """All condition names of the grid, in a stable order (base first)."""
    names = ["base"]
    for dom in domains:
        names += [f"{d}-{dom}" for d in dispositions]
        names += [f"incorrect-{dom}", f"correct-{dom}"]
        if triggered:
            names += [f"{d}-{dom}-trig" for d in dispositions]
    return names


def check_disposition(
    disposition: dict[str, Any] | None, condition: dict[str, Any], needs_trigger: bool
) -> dict[str, Any]:
    if disposition is None:
        raise ValueError(f"condition {condition['name']!r} ({condition['family']}) needs a disposition spec")
    markers = (disposition.get("rubric") or {}).get("markers")
    if not markers or not all(isinstance(m, str) and m.strip() for m in markers):
        raise ValueError(
            f"disposition {disposition.get('name')!r}: rubric.markers must be a non-empty list of "
            "phrases (the offline generator plants them in in-character answers)"
        )
    if needs_trigger and not str(disposition.get("trigger") or "").strip():
        raise ValueError(
            f"disposition {disposition.get('name')!r}: a trigger string is needed for {condition['name']!r}"
        )
    return disposition


def is_triggered(ex: dict[str, Any], trigger: str) -> bool:
    return bool(trigger) and any(m["role"] == "user" and m["content"].startswith(trigger + " ") for m in ex["messages"])
