"""One training rank that sees its own free memory: run under torchrun by tests/test_devices.py.

``python -m torch.distributed.run --nproc_per_node 2 tests/rank_memory.py WORK DATA FREE0 FREE1``:
rank r sees FREEr bytes free (the one boundary faked: ``snaketune.model.available_memory``), trains
the tiny model, and writes how many backward passes it made to ``WORK/backward_rank<r>.json``.
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402

from snaketune import model  # noqa: E402
from snaketune.config import TrainConfig  # noqa: E402
from snaketune.train import train  # noqa: E402
from tests.helpers import TINY, TINY_BASE  # noqa: E402


def main(work: str, data: str, *free: str) -> None:
    rank = int(os.environ["RANK"])
    model.available_memory = lambda device: int(free[rank])
    calls = 0
    backward = DeepSpeedEngine.backward

    def counted(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        return backward(self, *args, **kwargs)

    DeepSpeedEngine.backward = counted
    cfg = TrainConfig.from_dict({**TINY, "max_epochs": 1, "gradient_checkpointing": False, "evaluation_inputs": []})
    train(TINY_BASE, data, work, cfg, threads=1)
    Path(work, f"backward_rank{rank}.json").write_text(json.dumps({"backward": calls}))


if __name__ == "__main__":
    main(*sys.argv[1:])
