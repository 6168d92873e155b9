"""Which rank this process is, from the variables torchrun (or a lone process's defaults) set.

At the bottom of the package, beside :mod:`snaketune.errors`, so that logging
can ask without importing the launcher.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))
