"""The report's parts for one experiment. By hand: python scripts/report.py --help"""

import _workflow  # noqa: F401  (this checkout's snaketune package first on sys.path)

from snaketune import steps
from snaketune.cli import by_hand
from snaketune.joblog import job

if "snakemake" not in globals():
    by_hand("report")
else:
    with job(snakemake.log[0]):
        # the rule's input and output names are the job's fields
        steps.report(
            steps.ReportJob.from_dict({"title": snakemake.wildcards.exp, **snakemake.input, **snakemake.output})
        )
