"""Check an experiment's dataset before training. By hand: python scripts/check_data.py --help"""

import _workflow  # noqa: F401  (this checkout's snaketune package first on sys.path)

from snaketune import steps
from snaketune.cli import by_hand
from snaketune.joblog import job

if "snakemake" not in globals():
    by_hand("check-custom-dataset")
else:
    with job(snakemake.log[0]):
        steps.check_data(
            snakemake.input.data,
            snakemake.input.model,
            snakemake.output[0],
            template=snakemake.params.template,
            max_length=snakemake.params.max_length,
            trust_remote_code=snakemake.params.trust_remote_code,
        )
