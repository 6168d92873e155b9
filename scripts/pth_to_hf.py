"""Checkpoint -> PEFT adapter (xtuner convert pth_to_hf). By hand: python scripts/pth_to_hf.py --help"""

import json

from snaketune.cli import script

script("pth_to_hf", globals().get("snakemake"),
       lambda s: ["--lora", json.dumps(s.params.lora), "--base-model", s.input.model,
                  "--max-shard-size", s.params.max_shard_size, *(["--fp32"] if s.params.fp32 else []),
                  s.input.training, s.output[0]])
