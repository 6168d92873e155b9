rule train:
    """QLoRA with DeepSpeed ZeRO-2. Checkpoints go to work_dirs/{exp}/iter_N.pth, which is
    not a declared output: Snakemake never deletes it, and a re-run resumes from it."""
    input:
        model=model_dir,
        data=experiment_data,
        mixture_sources=mixture_sources,
        data_check="results/{exp}/data_check.txt",
    output:
        summary="results/{exp}/training.json",
        metrics="results/{exp}/metrics.jsonl",
        provenance="results/{exp}/provenance.json",
    log:
        "logs/train/{exp}.log",
    benchmark:
        "benchmarks/train/{exp}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 8
    resources:
        gpu=lambda wc: resolved(wc.exp).gpus,
    params:
        train=section("train"),
        model=model_section,
        record=provenance_record,
        work_dir=lambda wc: f"work_dirs/{wc.exp}",
        # null: one rank per GPU the job got (a profile may set the gpu count)
        ranks=lambda wc: resolved(wc.exp).ranks,
    script:
        "../scripts/train.py"
