rule evaluate:
    """Base vs fine-tuned answers side by side; fails when merged and base + adapter disagree,
    or when a fine-tuned answer never stops."""
    input:
        model=model_dir,
        adapter="results/{exp}/adapter",
        merged="results/{exp}/merged",
        data=experiment_data,
    output:
        answers="results/{exp}/evaluation.jsonl",
        markdown="results/{exp}/evaluation.md",
    log:
        "logs/evaluate/{exp}.log",
    benchmark:
        "benchmarks/evaluate/{exp}.tsv"
    conda:
        "../envs/evaluate.yaml"
    params:
        template=lambda wc: experiment(wc)["train"]["template"],
        system=lambda wc: experiment(wc)["train"]["SYSTEM"],
        spec=lambda wc: experiment(wc)["evaluation"],
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/evaluate.py"
