"""What fine-tuning gained and cost, the thresholds and the export checks. By hand: python scripts/evaluate.py --help"""

import _workflow  # noqa: F401  (this checkout's snaketune package first on sys.path)
from snaketune import steps
from snaketune.cli import by_hand
from snaketune.config import EvaluationConfig
from snaketune.joblog import job

if "snakemake" not in globals():
    by_hand("evaluate")
else:
    params = snakemake.params
    with job(snakemake.log[0]):
        steps.evaluate(snakemake.input.model, snakemake.input.adapter, snakemake.input.merged,
                       EvaluationConfig.from_dict(params.evaluation), template=params.template,
                       system=params.system, data_file=snakemake.input.data, answers=snakemake.output.answers,
                       markdown=snakemake.output.markdown, summary=snakemake.output.summary,
                       trust_remote_code=params.trust_remote_code)
