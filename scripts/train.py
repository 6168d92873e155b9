"""QLoRA training, resumable. By hand: python scripts/train.py --help"""

import json

from snaketune.cli import script

script("train", globals().get("snakemake"),
       lambda s: ["--model", s.input.model, "--data", s.input.data, "--work-dir", s.params.work_dir,
                  "--settings", json.dumps(s.params.settings), "--threads", s.threads, s.output[0]])
