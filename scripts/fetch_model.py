"""Link, download or import the base model. By hand: python scripts/fetch_model.py --help"""

import json

from snaketune.cli import script

script("fetch-model", globals().get("snakemake"),
       lambda s: ["--spec", json.dumps(s.params.spec), "--cache-dir", s.params.cache_dir, s.output[0]])
