"""Mix an experiment's datasets into one training file. By hand: python scripts/mix_data.py --help"""

import _workflow  # noqa: F401  (this checkout's snaketune package first on sys.path)

from snaketune import steps
from snaketune.cli import by_hand
from snaketune.joblog import job

if "snakemake" not in globals():
    by_hand("mix-data")
else:
    with job(snakemake.log[0]):
        steps.mix_data(
            snakemake.params.parts, snakemake.output.data, snakemake.output.sources, seed=snakemake.params.seed
        )
