"""One training over two machines: a real two-node SLURM cluster on loopback (tests/slurm_cluster.py), the
train job one allocation over both nodes through profiles/slurm, one rank on each node."""

import copy
import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from snaketune.checkpoints import COMPLETE
from snaketune.config import LAYOUT

from .helpers import SNAKEMAKE, TINY, TINY_CONFIG, assert_same_state, copy_workflow, missing, run
from .slurm_cluster import Cluster, available, cpu_node_profile

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SUMMARY = LAYOUT.summary.format(exp="tiny")
# long enough to be killed between two checkpoints; the data's order and the ranks' threads are fixed
TRAIN = {
    **TINY,
    "max_epochs": 6,
    "save_steps": 2,
    "save_total_limit": 10,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
}


@pytest.fixture(scope="module")
def cluster():
    why = available()
    if why:
        missing(f"no SLURM cluster here: {why}")
    c = Cluster(nodes=2).start()
    yield c
    c.stop()


def workflow(path, *, nodes=1, ranks=None):
    """The tiny experiment on `nodes` nodes of `ranks` ranks, one thread per rank, through the SLURM profile."""
    wd = copy_workflow(path)
    config = copy.deepcopy(TINY_CONFIG)
    config["experiments"]["tiny"].update(nodes=nodes, ranks=ranks)
    config["experiments"]["tiny"]["train"].update(TRAIN)
    (wd / "config" / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    profile = cpu_node_profile(wd, gpu=nodes)  # one (name-only) GPU per node
    profile["set-threads"]["train"] = ranks or 1
    profile["retries"] = 0
    (wd / "profiles/slurm/config.yaml").write_text(yaml.safe_dump(profile))
    return wd


def trained_lora(wd):
    """The final checkpoint's LoRA weights, and the training summary."""
    from snaketune.lora_state import read_lora_state

    summary = json.loads((wd / SUMMARY).read_text())
    return read_lora_state(wd / summary["checkpoint"]), summary


@pytest.fixture(scope="module")
def one_node_two_ranks(tmp_path_factory):
    """The reference: the same training on 2 ranks of one machine, run locally."""
    wd = workflow(tmp_path_factory.mktemp("one_node"), ranks=2)
    run([*SNAKEMAKE, SUMMARY, "--cores", "2", "--set-threads", "train=2"], cwd=wd, timeout=900)
    return wd


def rank_on_node(node: str) -> int | None:
    """The pid of a training rank that runs on `node` (its processes see the node's host name)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"snaketune.rank_main" in cmdline and b"--node" not in cmdline and b"LOCAL_RANK=0" in environ:
            if (
                subprocess.run(["nsenter", "-t", pid, "-u", "hostname"], capture_output=True, text=True).stdout.strip()
                == node
            ):
                return int(pid)
    return None


def test_train_job_spans_two_nodes_survives_a_dead_node_and_equals_two_ranks_on_one(
    cluster, one_node_two_ranks, tmp_path
):
    """nodes: 2 makes the train job one allocation over both nodes, one rank each. Killing the ranks of
    one node mid-way fails the job at once (srun ends the other node's), naming the cause; the same command
    again resumes, and the training ends equal, bit for bit, to 2 ranks on one node run without a break."""
    wd = workflow(tmp_path / "wf", nodes=2)
    proc = subprocess.Popen(
        [*SNAKEMAKE, SUMMARY, "--workflow-profile", "profiles/slurm"],
        cwd=wd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 600
        while not (wd / "work_dirs/tiny/iter_2.pth" / COMPLETE).exists():
            assert proc.poll() is None and time.time() < deadline, "the workflow ended before the checkpoint"
            time.sleep(0.2)
        pid = rank_on_node("stnode2")
        assert pid, "no rank found on stnode2"
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out[-3000:]
    log = (wd / "logs/train/tiny.log").read_text()
    assert "starting 2 nodes x 1 rank: srun --nodes=2 --ntasks=2" in log
    assert "LaunchError: the training across 2 nodes stopped" in log
    assert not (wd / SUMMARY).exists()

    run([*SNAKEMAKE, SUMMARY, "--workflow-profile", "profiles/slurm"], cwd=wd, timeout=900)  # the same again
    lora, summary = trained_lora(wd)
    assert summary["resumed_from"] >= 2
    assert (summary["world_size"], summary["nodes"], summary["ranks_per_node"]) == (2, 2, 1)
    assert sorted(summary["hosts"]) == ["stnode1", "stnode2"]
    prov = json.loads((wd / LAYOUT.provenance.format(exp="tiny")).read_text())
    assert sorted(prov["hosts"]) == ["stnode1", "stnode2"] and prov["nodes"] == 2
    assert "rank1" in (wd / "logs/train/tiny.rank1.log").read_text()
    assert_same_state(lora, trained_lora(one_node_two_ranks)[0])
