"""snaketune: reproducible QLoRA fine-tuning of chat models, as a Snakemake workflow."""

__version__ = "0.1.0"
