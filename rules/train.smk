rule train_adapter:
    input:
        data="results/data/{trained}/train.jsonl",
        manifest="results/data/{trained}/manifest.json",
        model=get_base_model,
    output:
        adapter="results/adapters/{model}/{trained}/seed{seed}/adapter_model.safetensors",
        adapter_config="results/adapters/{model}/{trained}/seed{seed}/adapter_config.json",
        run="results/adapters/{model}/{trained}/seed{seed}/run.json",
        steps="results/adapters/{model}/{trained}/seed{seed}/train_log.jsonl",
    log:
        "logs/train_adapter/{model}/{trained}/seed{seed}.log",
    benchmark:
        "benchmarks/runs/train_adapter/{model}/{trained}/seed{seed}.tsv"
    conda:
        "../envs/train.yaml"
    params:
        base_model=get_model_source,
        revision=get_model_revision,
        hparams=get_train_params,
        # Which lines of train.jsonl this seed trains on (character_em.data.pairing.training_draw).
        draw=get_draw_params,
        # Outside the declared outputs: Snakemake deletes outputs before a rerun, and a
        # preempted job must find its checkpoints.
        checkpoint_dir="results/checkpoints/{model}/{trained}/seed{seed}",
        # The adapters saved at train.eval_steps, outside the outputs for the same reason;
        # rule publish_adapter_step (rules/trajectory.smk) makes each a tracked file.
        steps_dir="results/adapter_steps/{model}/{trained}/seed{seed}",
    script:
        "../workflow_scripts/train_adapter.py"


rule plot_loss_curve:
    input:
        steps="results/adapters/{model}/{trained}/seed{seed}/train_log.jsonl",
    output:
        figure="results/adapters/{model}/{trained}/seed{seed}/loss_curve.png",
    log:
        "logs/plot_loss_curve/{model}/{trained}/seed{seed}.log",
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/plot_loss_curve.py"
