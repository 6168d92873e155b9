"""Base vs fine-tuned answers and the export checks. By hand: python scripts/evaluate.py --help"""

import json

from snaketune.cli import script

script("evaluate", globals().get("snakemake"),
       lambda s: ["--template", s.params.template, "--system", s.params.system,
                  "--spec", json.dumps(s.params.spec), "--data", s.input.data, "--markdown", s.output.markdown,
                  *(["--trust-remote-code"] if s.params.trust_remote_code else []),
                  s.input.model, s.input.adapter, s.input.merged, s.output.answers])
