"""Convert a dataset to XTuner's conversation format. By hand: python scripts/convert_data.py --help"""

import _workflow  # noqa: F401  (this checkout's snaketune package first on sys.path)

from snaketune import steps
from snaketune.cli import by_hand
from snaketune.config import DatasetConfig
from snaketune.joblog import job

if "snakemake" not in globals():
    by_hand("convert-data")
else:
    with job(snakemake.log[0]):
        steps.convert_data(DatasetConfig.from_dict(snakemake.params.dataset), snakemake.output[0])
