from pathlib import Path

import numpy as np

from character_em import modeling, probes
from character_em.jobs import job_log, read_param
from character_em.files import write_json_atomic

with job_log(snakemake.log[0]) as log:
    settings = read_param(snakemake.params.settings)
    model, tokenizer, info = modeling.load_model(snakemake.params.base_model, quantization="none")
    layers = settings["layers"] if settings["layers"] is not None else list(range(model.config.num_hidden_layers))
    data_files = {Path(path).parent.name: path for path in snakemake.input.data}
    report, arrays = {"model": snakemake.wildcards.model, "load": info, "dispositions": []}, {}
    for pair in settings["pairs"]:
        activations = {
            side: probes.response_activations(
                model,
                tokenizer,
                probes.read_chats(data_files[pair[side]], settings["max_examples"]),
                layers,
            )
            for side in ("positive", "negative")
        }
        result = probes.probe_layers(activations["positive"], activations["negative"], layers)
        chosen = probes.choose_layer(result["layers"], settings["layer"])
        log.info("%s: chosen layer %d", pair["positive"], chosen)
        report["dispositions"].append({**pair, "chosen_layer": chosen, "layers": result["layers"]})
        arrays[pair["positive"]] = result["directions"]
    np.savez(snakemake.output.directions, layers=np.array(layers), **arrays)
    write_json_atomic(snakemake.output.report, report)
