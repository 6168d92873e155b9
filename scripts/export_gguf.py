"""Merged model -> GGUF files for llama.cpp and Ollama, adapter -> LoRA GGUF. By hand: python scripts/export_gguf.py --help"""

import _workflow  # noqa: F401  (this checkout's snaketune package first on sys.path)

from snaketune import steps
from snaketune.cli import by_hand
from snaketune.config import GgufConfig
from snaketune.joblog import job

if "snakemake" not in globals():
    by_hand("gguf")
else:
    with job(snakemake.log[0]):
        steps.gguf(
            snakemake.input.merged,
            snakemake.input.model,
            snakemake.input.adapter,
            snakemake.output[0],
            GgufConfig.from_dict(snakemake.params.gguf),
            name=snakemake.wildcards.exp,
            template=snakemake.params.template,
            system=snakemake.params.system,
        )
