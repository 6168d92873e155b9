"""The report's parts for one experiment. By hand: python scripts/report.py --help"""

import _workflow  # noqa: F401  (this checkout's snaketune package first on sys.path)
from snaketune import steps
from snaketune.cli import by_hand
from snaketune.joblog import job

if "snakemake" not in globals():
    by_hand("report")
else:
    with job(snakemake.log[0]):
        steps.report(title=snakemake.wildcards.exp, metrics=snakemake.input.metrics,
                     evaluation=snakemake.input.evaluation,
                     evaluation_summary=snakemake.input.evaluation_summary, provenance=snakemake.input.provenance,
                     benchmarks=list(snakemake.input.benchmarks), curves=snakemake.output.curves,
                     evaluation_page=snakemake.output.evaluation, provenance_page=snakemake.output.provenance,
                     benchmarks_page=snakemake.output.benchmarks)
