"""What fine-tuning gained and cost, the thresholds and the export checks. By hand: python scripts/evaluate.py --help"""

import _workflow  # noqa: F401  (this checkout's snaketune package first on sys.path)

from snaketune import steps
from snaketune.cli import by_hand
from snaketune.joblog import job

if "snakemake" not in globals():
    by_hand("evaluate")
else:
    with job(snakemake.log[0]):
        # the rule's input, output and params names are the job's fields
        # and resources.gpu: the GPUs the job was given
        fields = {**snakemake.input, **snakemake.output, **snakemake.params}
        steps.evaluate(steps.EvaluateJob.from_dict({**fields, "gpus": int(snakemake.resources.get("gpu", 0))}))
