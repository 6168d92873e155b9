rule pth_to_hf:
    """The final checkpoint as a PEFT adapter (xtuner convert pth_to_hf); fails on an empty or all-zero adapter."""
    input:
        summary="results/{exp}/training.json",
        model=model_dir,
    output:
        directory("results/{exp}/adapter"),
    log:
        "logs/pth_to_hf/{exp}.log",
    benchmark:
        "benchmarks/pth_to_hf/{exp}.tsv"
    conda:
        "../envs/pth_to_hf.yaml"
    params:
        lora=lora,
        export=section("export"),
    script:
        "../scripts/pth_to_hf.py"


rule merge:
    """Base + adapter merged into one model that plain transformers loads (xtuner convert merge)."""
    input:
        model=model_dir,
        adapter="results/{exp}/adapter",
    output:
        directory("results/{exp}/merged"),
    log:
        "logs/merge/{exp}.log",
    benchmark:
        "benchmarks/merge/{exp}.tsv"
    conda:
        "../envs/merge.yaml"
    params:
        merge=section("merge"),
        template=template,
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/merge.py"
