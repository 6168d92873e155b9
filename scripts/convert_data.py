"""Convert a dataset to XTuner's conversation format. By hand: python scripts/convert_data.py --help"""

from snaketune.cli import script

script("convert-data", globals().get("snakemake"),
       lambda s: ["--format", s.params.format, "--split", s.params.split, s.params.source, s.output[0]])
