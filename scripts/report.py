"""The report's parts for one experiment. By hand: python scripts/report.py --help"""

from snaketune.cli import script

script("report", globals().get("snakemake"),
       lambda s: ["--title", s.wildcards.exp, "--training", s.input.training, "--evaluation", s.input.evaluation,
                  "--provenance", s.input.provenance, "--curves", s.output.curves,
                  "--evaluation-page", s.output.evaluation, "--provenance-page", s.output.provenance,
                  "--benchmarks-page", s.output.benchmarks, *s.input.benchmarks])
