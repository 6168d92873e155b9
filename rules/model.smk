# Downloads need the internet, which login nodes have and compute nodes often not.
localrules:
    fetch_model,


rule fetch_model:
    """Link (local), download (modelscope, huggingface) or import (gguf) the base model."""
    output:
        directory(LAYOUT.model_dir),
    log:
        LAYOUT.log("fetch_model", "{model}"),
    benchmark:
        LAYOUT.benchmark("fetch_model", "{model}")
    conda:
        "../envs/fetch_model.yaml"
    params:
        model=model_params,
        cache_dir=LAYOUT.downloads,
    script:
        "../scripts/fetch_model.py"
