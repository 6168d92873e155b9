# Downloads need the internet, which login nodes have and compute nodes often not.
localrules:
    fetch_model,


rule fetch_model:
    """Link (local), download (modelscope, huggingface) or import (gguf) the base model."""
    output:
        directory("resources/models/{model}"),
    log:
        "logs/fetch_model/{model}.log",
    benchmark:
        "benchmarks/fetch_model/{model}.tsv"
    conda:
        "../envs/fetch_model.yaml"
    params:
        model=model_params,
        cache_dir="resources/downloads",
    script:
        "../scripts/fetch_model.py"
