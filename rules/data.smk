# Generating, converting and checking data is light, and converting from a hub needs the internet,
# which login nodes have and compute nodes often not.
localrules:
    generate_data,
    convert_data,
    mix_data,
    check_data,


rule generate_data:
    """The self-cognition dataset ("XXX的小助手"), in XTuner's conversation format."""
    output:
        LAYOUT.generated_data,
    log:
        LAYOUT.log("generate_data", "{dataset}"),
    benchmark:
        LAYOUT.benchmark("generate_data", "{dataset}")
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
        LAYOUT.converted_data,
    log:
        LAYOUT.log("convert_data", "{dataset}"),
    benchmark:
        LAYOUT.benchmark("convert_data", "{dataset}")
    conda:
        "../envs/convert_data.yaml"
    params:
        dataset=dataset_params,
    script:
        "../scripts/convert_data.py"


rule replay_data:
    """A model's own greedy answers to the training part of a general question set (self-distillation),
    to mix into fine-tuning data so the model keeps its general ability."""
    input:
        model=replay_model,
    output:
        LAYOUT.replay_data,
    log:
        LAYOUT.log("replay_data", "{dataset}"),
    benchmark:
        LAYOUT.benchmark("replay_data", "{dataset}")
    conda:
        "../envs/replay_data.yaml"
    threads: MODEL_THREADS
    resources:
        gpu=replay_gpus,
    params:
        dataset=dataset_params,
        trust_remote_code=replay_trust_remote_code,
    script:
        "../scripts/replay_data.py"


rule mix_data:
    """An experiment's datasets concatenated, each `repeat` times, into one training file; sources.json
    records each dataset's file, hash and record counts (for provenance)."""
    input:
        mixture_inputs,
    output:
        data=LAYOUT.mixture,
        sources=LAYOUT.mixture_sources,
    log:
        LAYOUT.log("mix_data", "{exp}"),
    benchmark:
        LAYOUT.benchmark("mix_data", "{exp}")
    conda:
        "../envs/mix_data.yaml"
    params:
        parts=mixture_parts,
        seed=train_seed,
    script:
        "../scripts/mix_data.py"


rule check_data:
    """`snaketune check-custom-dataset` before training: every record of each of the experiment's
    datasets valid, token lengths under its template and max_length; bad data stops the workflow here.
    """
    input:
        model=model_dir,
        data=mixture_inputs,
    output:
        LAYOUT.data_check,
    log:
        LAYOUT.log("check_data", "{exp}"),
    benchmark:
        LAYOUT.benchmark("check_data", "{exp}")
    conda:
        "../envs/check_data.yaml"
    params:
        template=template,
        max_length=lambda wc: resolved(wc.exp).train.max_length,
        trust_remote_code=trust_remote_code,
    script:
        "../scripts/check_data.py"
