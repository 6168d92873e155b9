"""What each training rank runs: ``python -m snaketune.rank_main JOB``; and, on each node of a
training over several nodes started by srun, ``python -m snaketune.rank_main --node SPEC``, which
becomes that node's torchrun.

:func:`snaketune.launch.relaunch` execs this under torchrun (one process per
rank), or alone for a one-rank job that starts afresh on another malloc
(the same pid, so whoever watches the job still sees it). JOB is the train
step's :class:`~snaketune.steps.TrainJob` as JSON.
"""

from __future__ import annotations

import json
import os
import sys

from . import steps
from .joblog import job
from .launch import die_with_parent, inside_launcher, node_torchrun


def main(argv: list[str]) -> None:
    if argv[0] == "--node":
        cmd = node_torchrun(json.loads(argv[1]))
        os.execv(cmd[0], cmd)
    train_job = steps.TrainJob.from_dict(json.loads(argv[0]))
    if inside_launcher():
        die_with_parent()
    with job(train_job.log_file):
        steps.train(train_job)


if __name__ == "__main__":
    main(sys.argv[1:])
