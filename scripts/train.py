"""QLoRA training, resumable. By hand: python scripts/train.py --help"""

from pathlib import Path

import _workflow  # noqa: F401  (this checkout's snaketune package first on sys.path)

from snaketune import steps
from snaketune.cli import by_hand
from snaketune.config import ModelConfig, TrainConfig
from snaketune.joblog import job

if "snakemake" not in globals():
    by_hand("train")
else:
    params = snakemake.params
    # resources.gpu counts the job's GPUs on all its nodes, as SLURM's --gpus does
    gpus, nodes = int(snakemake.resources.get("gpu", 0)), int(snakemake.resources.get("nodes", 1))
    with job(snakemake.log[0]):
        steps.train(
            steps.TrainJob(
                model_dir=snakemake.input.model,
                data_file=snakemake.input.data,
                work_dir=params.work_dir,
                summary=snakemake.output.summary,
                metrics=snakemake.output.metrics,
                provenance=snakemake.output.provenance,
                train=TrainConfig.from_dict(params.train),
                model=ModelConfig.from_dict(params.model),
                record=params.record,
                mixture_sources=next(iter(snakemake.input.mixture_sources), None),  # none for one dataset
                # null ranks: one per GPU the job got on each node (a profile may set the gpu count)
                ranks=params.ranks or max(1, gpus // nodes),
                nodes=nodes,
                gpus=gpus // nodes,
                experiment_gpus=params.record["gpus"],  # checked against the job's gpus
                threads=snakemake.threads,
                workflow_dir=Path(snakemake.scriptdir).parent,
                log_file=snakemake.log[0],
            )
        )
