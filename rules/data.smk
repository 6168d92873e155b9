# Generating and converting data is light, and converting from a hub needs the internet,
# which login nodes have and compute nodes often not.
localrules:
    generate_data,
    convert_data,


rule generate_data:
    """The self-cognition dataset ("XXX的小助手"), in XTuner's conversation format."""
    output:
        "results/data/generated/{dataset}.json",
    log:
        "logs/generate_data/{dataset}.log",
    benchmark:
        "benchmarks/generate_data/{dataset}.tsv"
    conda:
        "../envs/generate_data.yaml"
    params:
        dataset=dataset_params,
    script:
        "../scripts/generate_data.py"


rule convert_data:
    """alpaca / oasst1 / OpenAI messages / XTuner files (local, or a hub dataset) to XTuner's format."""
    input:
        dataset_local_input,
    output:
        "results/data/converted/{dataset}.json",
    log:
        "logs/convert_data/{dataset}.log",
    benchmark:
        "benchmarks/convert_data/{dataset}.tsv"
    conda:
        "../envs/convert_data.yaml"
    params:
        dataset=dataset_params,
    script:
        "../scripts/convert_data.py"
