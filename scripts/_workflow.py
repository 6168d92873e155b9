"""Puts the snaketune package beside scripts/ first on sys.path.

Every script imports this first. Snakemake (and Python, for a script run by
hand) puts scripts/ on the path; the package itself lives one folder up, so a
job uses this checkout's code in any environment: a conda env or container
installs only the dependencies, never the package.
"""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
