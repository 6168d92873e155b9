"""Write a replay dataset: the model's own answers to general questions. By hand: python scripts/replay_data.py --help"""

import _workflow  # noqa: F401  (this checkout's snaketune package first on sys.path)

from snaketune import steps
from snaketune.cli import by_hand
from snaketune.config import DatasetConfig
from snaketune.joblog import job

if "snakemake" not in globals():
    by_hand("replay-data")
else:
    with job(snakemake.log[0]):
        steps.replay_data(
            DatasetConfig.from_dict(snakemake.params.dataset),
            snakemake.input.model,
            snakemake.output[0],
            trust_remote_code=snakemake.params.trust_remote_code,
            gpus=int(snakemake.resources.get("gpu", 0)),
        )
