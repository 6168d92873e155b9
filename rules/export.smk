rule pth_to_hf:
    """The final checkpoint as a PEFT adapter (xtuner convert pth_to_hf); fails on an empty or all-zero adapter."""
    input:
        training="results/{exp}/training.json",
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
        lora=lambda wc: experiment(wc)["train"]["lora"],
        fp32=lambda wc: experiment(wc)["export"]["fp32"],
        max_shard_size=lambda wc: experiment(wc)["export"]["max_shard_size"],
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
        template=lambda wc: experiment(wc)["train"]["template"],
        dtype=lambda wc: experiment(wc)["merge"]["dtype"],
        max_shard_size=lambda wc: experiment(wc)["merge"]["max_shard_size"],
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/merge.py"
