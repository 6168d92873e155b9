"""Base + adapter -> merged model (xtuner convert merge). By hand: python scripts/merge.py --help"""

import _workflow  # noqa: F401  (this checkout's snaketune package first on sys.path)

from snaketune import steps
from snaketune.cli import by_hand
from snaketune.config import MergeConfig
from snaketune.joblog import job

if "snakemake" not in globals():
    by_hand("merge")
else:
    with job(snakemake.log[0]):
        steps.merge(
            snakemake.input.model,
            snakemake.input.adapter,
            snakemake.output[0],
            MergeConfig.from_dict(snakemake.params.merge),
            template=snakemake.params.template,
            trust_remote_code=snakemake.params.trust_remote_code,
        )
