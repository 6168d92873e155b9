"""Write the self-cognition dataset. By hand: python scripts/generate_data.py --help"""

import json

from snaketune.cli import script

script("generate-data", globals().get("snakemake"),
       lambda s: ["--spec", json.dumps(s.params.spec), s.output[0]])
