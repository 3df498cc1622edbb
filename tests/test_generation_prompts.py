"""Data writers never see the rubric's marker phrases: those belong to the rubric test instrument alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from character_em import config as cfg
from character_em.data import generate as G

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", ["config.yaml", "presets/smoke.yaml", "presets/demo.yaml"])
def test_rendered_writer_prompts_hold_no_rubric_marker(config: str) -> None:
    resolved = cfg.load_config(ROOT / config)
    templates = G.load_prompt_templates()
    for name in cfg.written_conditions(resolved):  # a matched arm's data is subsampled, not written
        spec = cfg.data_spec(resolved, name)
        prompts = G.condition_prompts(
            spec["condition"], disposition=spec["disposition"], domain=spec["domain"], templates=templates
        )
        text = " ".join(p["text"].lower() for p in prompts.values())
        for disposition in resolved["dispositions"].values():
            for marker in disposition["rubric"]["markers"]:
                assert marker.lower() not in text, f"{name}: the writer is told the rubric marker {marker!r}"


def test_a_prompts_file_asking_for_the_markers_is_refused(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "src/character_em/resources/generation_prompts.yaml").read_text())
    doc["character"] += "\nUse these phrases: {markers}."
    path = tmp_path / "lab_prompts.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError) as caught:
        G.load_prompt_templates(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: character: {{markers}}:") and "rubric" in message
