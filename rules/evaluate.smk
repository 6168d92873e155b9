rule evaluate:
    """What fine-tuning gained and cost: identity (trained, held-out), leakage, retention, likelihood
    drift; fails when a configured threshold is missed, when merged and base + adapter disagree,
    or when a fine-tuned answer never stops."""
    input:
        model=model_dir,
        adapter=LAYOUT.adapter,
        merged=LAYOUT.merged,
        data=experiment_data,
    output:
        answers=LAYOUT.answers,
        markdown=LAYOUT.evaluation,
        summary=LAYOUT.evaluation_summary,
    log:
        LAYOUT.log("evaluate", "{exp}"),
    benchmark:
        LAYOUT.benchmark("evaluate", "{exp}")
    conda:
        "../envs/evaluate.yaml"
    threads: MODEL_THREADS
    resources:
        gpu=inference_gpus,
    params:
        evaluation=section("evaluation"),
        template=template,
        system=system_prompt,
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/evaluate.py"
