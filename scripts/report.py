"""The report's parts for one experiment. By hand: python scripts/report.py --help"""

from snaketune import steps
from snaketune.cli import by_hand
from snaketune.joblog import job

if "snakemake" not in globals():
    by_hand("report")
else:
    with job(snakemake.log[0]):
        steps.report(title=snakemake.wildcards.exp, metrics=snakemake.input.metrics,
                     evaluation=snakemake.input.evaluation, provenance=snakemake.input.provenance,
                     benchmarks=list(snakemake.input.benchmarks), curves=snakemake.output.curves,
                     evaluation_page=snakemake.output.evaluation, provenance_page=snakemake.output.provenance,
                     benchmarks_page=snakemake.output.benchmarks)
