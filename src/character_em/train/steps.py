"""Publishing the adapters the trainer saved at ``eval_steps`` as files the workflow tracks.

The trainer writes them beside its checkpoints, outside every declared output, so a killed run
keeps them (``trainer.train_adapter``). Once the run has finished, each saved step is published
into its own output folder: hard links where the file system allows, copies otherwise. Pure file
operations, no torch.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

__all__ = ["STEP_INFO", "publish_saved_step"]

STEP_INFO = "step.json"
_FILES = {"adapter": "adapter_model.safetensors", "adapter_config": "adapter_config.json", "info": STEP_INFO}


def publish_saved_step(*, saved_dir: str | Path, run_json: str | Path, step: str, outputs: Mapping[str, str]) -> dict:
    """Link (or copy) the adapter saved at ``step`` to ``outputs`` (adapter, adapter_config, info).

    Refuses a saved step that the finished run in ``run_json`` did not save (another configuration's
    leftovers, or a step missing from its ``eval_steps``), naming the files. Returns the step record.
    """
    saved = Path(saved_dir)
    run = json.loads(Path(run_json).read_text())
    listed = {entry["label"]: entry for entry in run.get("eval_steps") or []}
    if step not in listed:
        raise ValueError(
            f"{run_json}: the finished run saved no step {step!r} (it saved {sorted(listed)});"
            " rerun its train_adapter job with the current train.eval_steps"
        )
    info_path = saved / STEP_INFO
    if not info_path.is_file():
        raise FileNotFoundError(
            f"{info_path}: the adapter saved at {step} is gone; rerun the train_adapter job (snakemake -R) to save it again"
        )
    info = json.loads(info_path.read_text())
    if info.get("run_key_sha256") != run.get("run_key_sha256") or info.get("step") != listed[step]["step"]:
        raise ValueError(
            f"{info_path}: saved by another run (run key {info.get('run_key_sha256')}, step {info.get('step')}) than"
            f" {run_json} (run key {run.get('run_key_sha256')}, step {listed[step]['step']}); rerun train_adapter"
        )
    for key, name in _FILES.items():
        source, target = saved / name, Path(outputs[key])
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        try:
            os.link(source, target)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(source, target)
    return info
