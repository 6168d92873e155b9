rule evaluate:
    """What fine-tuning gained and cost: identity (trained, held-out), leakage, retention, likelihood
    drift; fails when a configured threshold is missed, when merged and base + adapter disagree,
    or when a fine-tuned answer never stops."""
    input:
        model=model_dir,
        adapter="results/{exp}/adapter",
        merged="results/{exp}/merged",
        data=experiment_data,
    output:
        answers="results/{exp}/evaluation.jsonl",
        markdown="results/{exp}/evaluation.md",
        summary="results/{exp}/evaluation.json",
    log:
        "logs/evaluate/{exp}.log",
    benchmark:
        "benchmarks/evaluate/{exp}.tsv"
    conda:
        "../envs/evaluate.yaml"
    params:
        evaluation=section("evaluation"),
        template=template,
        system=system_prompt,
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/evaluate.py"
