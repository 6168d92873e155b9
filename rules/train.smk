rule train:
    """QLoRA with DeepSpeed ZeRO-2. Checkpoints go to the work directory (iter_N.pth), which is
    not a declared output: Snakemake never deletes it, and a re-run resumes from it."""
    input:
        model=model_dir,
        data=experiment_data,
        mixture_sources=mixture_sources,
        data_check=LAYOUT.data_check,
    output:
        summary=LAYOUT.summary,
        metrics=LAYOUT.metrics,
        provenance=LAYOUT.provenance,
    log:
        LAYOUT.log("train", "{exp}"),
    benchmark:
        LAYOUT.benchmark("train", "{exp}")
    conda:
        "../envs/train.yaml"
    threads: MODEL_THREADS
    resources:
        gpu=lambda wc: resolved(wc.exp).gpus * resolved(wc.exp).nodes,
        # several nodes: one SLURM allocation, one task per node that the job starts itself with srun
        nodes=lambda wc: resolved(wc.exp).nodes,
        tasks=lambda wc: resolved(wc.exp).nodes if resolved(wc.exp).nodes > 1 else None,
        mpi=lambda wc: "srun" if resolved(wc.exp).nodes > 1 else None,
    params:
        train=section("train"),
        model=model_section,
        record=provenance_record,
        work_dir=work_dir,
        # null: one rank per GPU the job got (a profile may set the gpu count)
        ranks=lambda wc: resolved(wc.exp).ranks,
    script:
        "../scripts/train.py"
