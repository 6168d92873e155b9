"""QLoRA training, resumable. By hand: python scripts/train.py --help"""

import json
from pathlib import Path

from snaketune.cli import script

script("train", globals().get("snakemake"),
       lambda s: ["--model", s.input.model, "--data", s.input.data, "--work-dir", s.params.work_dir,
                  "--settings", json.dumps(s.params.settings), "--threads", s.threads,
                  "--ranks", s.params.ranks or max(1, int(s.resources.get("gpu", 0))), "--provenance", s.output.provenance,
                  "--config-record", json.dumps(s.params.config_record), "--workflow-dir", Path(s.scriptdir).parent,
                  s.output.summary])
