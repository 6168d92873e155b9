rule train:
    """QLoRA with DeepSpeed ZeRO-2. Checkpoints go to work_dirs/{exp}/iter_N.pth, which is
    not a declared output: Snakemake never deletes it, and a re-run resumes from it."""
    input:
        model=model_dir,
        data=experiment_data,
    output:
        summary="results/{exp}/training.json",
        provenance="results/{exp}/provenance.json",
    log:
        "logs/train/{exp}.log",
    benchmark:
        "benchmarks/train/{exp}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 8
    resources:
        gpu=lambda wc: experiment(wc)["gpus"],
    params:
        settings=train_settings,
        work_dir=lambda wc: f"work_dirs/{wc.exp}",
        # null: one rank per GPU the job got (a profile may set the gpu count)
        ranks=lambda wc: experiment(wc)["ranks"],
        config_record=config_record,
    script:
        "../scripts/train.py"
