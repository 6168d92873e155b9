"""Base + adapter -> merged model (xtuner convert merge). By hand: python scripts/merge.py --help"""

from snaketune.cli import script

script("merge", globals().get("snakemake"),
       lambda s: ["--template", s.params.template, "--dtype", s.params.dtype,
                  "--max-shard-size", s.params.max_shard_size,
                  *(["--trust-remote-code"] if s.params.trust_remote_code else []),
                  s.input.model, s.input.adapter, s.output[0]])
