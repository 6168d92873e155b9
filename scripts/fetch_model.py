"""Link, download or import the base model. By hand: python scripts/fetch_model.py --help"""

import _workflow  # noqa: F401  (this checkout's snaketune package first on sys.path)

from snaketune import steps
from snaketune.cli import by_hand
from snaketune.config import ModelConfig
from snaketune.joblog import job

if "snakemake" not in globals():
    by_hand("fetch-model")
else:
    with job(snakemake.log[0]):
        steps.fetch_model(
            ModelConfig.from_dict(snakemake.params.model), snakemake.output[0], snakemake.params.cache_dir
        )
