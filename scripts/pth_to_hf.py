"""Checkpoint -> PEFT adapter (xtuner convert pth_to_hf). By hand: python scripts/pth_to_hf.py --help"""

import _workflow  # noqa: F401  (this checkout's snaketune package first on sys.path)

from snaketune import steps
from snaketune.cli import by_hand
from snaketune.config import ExportConfig, LoraConfig
from snaketune.joblog import job

if "snakemake" not in globals():
    by_hand("pth_to_hf")
else:
    with job(snakemake.log[0]):
        steps.pth_to_hf(
            snakemake.input.summary,
            snakemake.output[0],
            LoraConfig.from_dict(snakemake.params.lora),
            ExportConfig.from_dict(snakemake.params.export),
            base_model=snakemake.input.model,
        )
