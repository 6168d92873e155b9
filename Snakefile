# snaketune: XTuner's fine-tuning chain as one workflow.
#   data -> model -> train (QLoRA, DeepSpeed ZeRO-2) -> pth_to_hf -> merge -> evaluate (-> export_gguf)
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

# The snaketune package beside this Snakefile serves the workflow (and every job, through
# scripts/_workflow.py): conda envs and containers install only its dependencies.
sys.path.insert(0, workflow.basedir)
from snaketune.config import validate_schema


configfile: "config/config.yaml"


# One line naming the key (and the closest known one) where Snakemake would print the whole schema.
validate_schema(
    config,
    Path(workflow.basedir) / "config/schema.yaml",
    ", ".join(map(str, workflow.configfiles)) or "config",
    experiment=config.get("run", ""),
)


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/model.smk"
include: "rules/train.smk"
include: "rules/export.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


onstart:
    check_executor_for_nodes()


rule final_model:
    """The merged model and the evaluation of every experiment listed under `run`."""
    default_target: True
    input:
        final_outputs(config["run"]),


rule gguf:
    """GGUF files for llama.cpp and Ollama of every experiment listed under `run`."""
    input:
        gguf_outputs(config["run"]),


rule all:
    """Every experiment in the config."""
    input:
        final_outputs(list(config["experiments"])),
