# The character direction (eval suite `probes`): probes on the base model, mean activations of
# every condition, steering, and the tables and figures that compare them.


include: "directions_common.smk"


rule probes:
    input:
        model=get_base_model,
        data=get_probe_data,
        samples=get_probe_samples,
        scores=get_probe_scores,
    output:
        report="results/probes/{model}/probes.json",
        directions="results/probes/{model}/directions.npz",
        # The chosen layer read on shared training-data texts no probe reads: the report maps one
        # model family's probes into another's residual stream through them.
        anchors="results/probes/{model}/anchors.npz",
        # One .npy memmap per layer, written batch by batch (bounded memory on 14B models).
        activations=directory("results/probes/{model}/activations"),
    log:
        "logs/probes/{model}.log",
    benchmark:
        "benchmarks/runs/probes/{model}.tsv"
    conda:
        "../envs/evals.yaml"
    params:
        base_model=get_model_source,
        revision=get_model_revision,
        settings=get_probe_params,
    script:
        "../workflow_scripts/probes.py"


rule direction_means:
    input:
        model=get_base_model,
        adapter=get_adapter,
        em="results/samples/{model}/{condition}/seed{seed}/em.parquet",
        # The fixed texts every condition reads: the base model's em answers of the same seed.
        fixed="results/samples/{model}/base/seed{seed}/em.parquet",
        # Read at the layer the probes chose on validation.
        probes="results/probes/{model}/probes.json",
        trigger=get_direction_trigger_samples,
        # The identical texts of the trigger readings: the base model's untriggered answers.
        fixed_trigger=get_direction_fixed_trigger_samples,
        persona=get_direction_persona_samples,
    output:
        means="results/directions/{model}/{condition}/seed{seed}/means.npz",
        info="results/directions/{model}/{condition}/seed{seed}/means.json",
    log:
        "logs/direction_means/{model}/{condition}/seed{seed}.log",
    benchmark:
        "benchmarks/runs/direction_means/{model}/{condition}/seed{seed}.tsv"
    conda:
        "../envs/evals.yaml"
    params:
        base_model=get_model_source,
        revision=get_model_revision,
        adapter_dir=get_adapter_dir,
        settings=get_direction_means_params,
    script:
        "../workflow_scripts/direction_means.py"


rule steer:
    input:
        model=get_base_model,
        adapter=get_adapter,
        directions="results/probes/{model}/directions.npz",
    output:
        # Generation only, one arm set per job: a disposition's own direction or one of its controls
        # at matched norm; the answers are judged by rule judge_steering.
        answers="results/directions/{model}/steering/{condition}/seed{seed}/{direction}/{control}.parquet",
    log:
        "logs/steer/{model}/{condition}/seed{seed}/{direction}/{control}.log",
    benchmark:
        "benchmarks/runs/steer/{model}/{condition}/seed{seed}/{direction}/{control}.tsv"
    wildcard_constraints:
        direction=STEERED_DIRECTIONS,
        control=STEERING_CONTROLS,
    conda:
        "../envs/evals.yaml"
    resources:
        runtime=steer_runtime,
    params:
        base_model=get_model_source,
        revision=get_model_revision,
        adapter_dir=get_adapter_dir,
        settings=get_steering_params,
    script:
        "../workflow_scripts/steer.py"


# Every steered answer of one model judged through the same judge function, judge settings and cache as
# rule judge, in one job per model: a model judge loads once for all of that model's steering files.
rule judge_steering:
    input:
        answers=steering_wave("answers"),
        prompts=MAIN_JUDGE_PROMPTS,
    output:
        # In the order of the answers: steering_wave() builds the lists from one list of jobs.
        scores=steering_wave("scores"),
        summaries=steering_wave("summary"),
        job="results/directions/{model}/steering/judge.json",
    log:
        "logs/judge_steering/{model}.log",
    benchmark:
        "benchmarks/runs/judge_steering/{model}.tsv"
    conda:
        JUDGE_ENV
    resources:
        gpu=JUDGE_GPUS,
        mem_mb=JUDGE_MEM_MB,
        runtime=judge_steering_runtime,
    params:
        judge=get_judge_params,
        dispositions=get_dispositions_param,
        cache_dir=CONFIG["judge"]["cache_dir"],
    script:
        "../workflow_scripts/judge_steering.py"


rule directions_report:
    input:
        reports=expand("results/probes/{model}/probes.json", model=MODELS),
        directions=expand("results/probes/{model}/directions.npz", model=MODELS),
        anchors=expand("results/probes/{model}/anchors.npz", model=MODELS),
        means=direction_means_files("npz"),
        info=direction_means_files("json"),
        scores=direction_score_files(),
        steering=steering_files(),
        gate="results/tables/judge_gate.json",
    output:
        tables=expand(
            "results/tables/{table}.{ext}", table=DIRECTION_TABLES, ext=["csv", "md"]
        ),
        probe_auroc=report(
            "figures/probe_auroc.png",
            caption="../report/probe_auroc.rst",
            category="5. Character direction",
        ),
        projection_vs_misalignment=report(
            "figures/projection_vs_misalignment.png",
            caption="../report/projection_vs_misalignment.rst",
            category="5. Character direction",
        ),
        direction_cosine=report(
            "figures/direction_cosine.png",
            caption="../report/direction_cosine.rst",
            category="5. Character direction",
        ),
        direction_transfer=report(
            "figures/direction_transfer.png",
            caption="../report/direction_transfer.rst",
            category="5. Character direction",
        ),
        steering=report(
            "figures/steering.png",
            caption="../report/steering.rst",
            category="5. Character direction",
        ),
        pdfs=expand("figures/{figure}.pdf", figure=DIRECTION_FIGURES),
    log:
        "logs/directions_report.log",
    conda:
        "../envs/report.yaml"
    params:
        settings=get_directions_report_params,
        conditions=get_conditions_param,
        em_questions=EM_QUESTIONS,
    script:
        "../workflow_scripts/directions_report.py"
