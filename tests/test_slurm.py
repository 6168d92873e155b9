"""The workflow on a real SLURM cluster (one node on loopback) through profiles/slurm."""

import json
import os
import re
import subprocess
import time

import pytest
import yaml

from snaketune.checkpoints import COMPLETE

from .conftest import copy_workflow
from .slurm_cluster import Cluster, available
from .test_workflow import SNAKEMAKE, TINY_CONFIG

# What a CPU-only test node needs on top of the profile: no GPU gres, no accounting
# database (squeue for status), no account, a partition, memory that fits the node.
CPU_OVERRIDES = [
    "--slurm-no-account", "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2",
    "--default-resources", "slurm_partition=debug", "runtime=30", "mem_mb=3000", "cpus_per_task=1",
    "--set-resources", "train:gpu=0", "train:cpus_per_task=2", "train:mem_mb=4000",
    "--latency-wait", "5", "--jobs", "2",
]


@pytest.fixture(scope="module")
def cluster():
    why = available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the SLURM tests must run in CI, but: {why}")
        pytest.skip(why)
    c = Cluster().start()
    yield c
    c.stop()


def workflow(tmp_path):
    wd = copy_workflow(tmp_path / "wf")
    (wd / "config" / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG, allow_unicode=True))
    return wd


def slurm_snakemake(wd, *extra, check=True):
    cmd = [*SNAKEMAKE, "--workflow-profile", "profiles/slurm", *CPU_OVERRIDES, *extra, "--", "final_model"]
    res = subprocess.run(cmd, cwd=wd, capture_output=True, text=True, timeout=900)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake on SLURM failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


def submitted(output: str) -> dict[str, str]:
    """rule -> SLURM job id, from Snakemake's own report of each submission."""
    jobs = {}
    for m in re.finditer(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: ([^)]+)\)", output):
        rule = re.search(r"rule_(\w+?)(?:/|_wildcards)", m.group(2))
        jobs[rule.group(1) if rule else m.group(2)] = m.group(1)
    return jobs


def test_workflow_runs_through_sbatch(cluster, tmp_path):
    wd = workflow(tmp_path)
    res = slurm_snakemake(wd)
    out = res.stdout + res.stderr
    jobs = submitted(out)
    # every job but the local rules (fetch_model, generate_data) went through sbatch
    assert set(jobs) == {"train", "pth_to_hf", "merge", "evaluate"}, out[-3000:]
    for rule, jobid in jobs.items():
        logs = list((wd / ".snakemake/slurm_logs").glob(f"rule_{rule}/**/{jobid}.log"))
        assert logs, f"no SLURM log for {rule} job {jobid}"
    assert (wd / "results/tiny/merged/config.json").exists()
    assert (wd / "results/tiny/evaluation.md").exists()
    assert "Nothing to be done" in (slurm_snakemake(wd).stdout + slurm_snakemake(wd).stderr)


def test_scancelled_training_resumes_when_resubmitted(cluster, tmp_path):
    wd = workflow(tmp_path)
    proc = subprocess.Popen(
        [*SNAKEMAKE, "--workflow-profile", "profiles/slurm", *CPU_OVERRIDES, "--retries", "0", "--", "final_model"],
        cwd=wd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not (wd / "work_dirs/tiny/iter_4.pth" / COMPLETE).exists():
        assert proc.poll() is None and time.time() < deadline, "the workflow ended before the first checkpoint"
        time.sleep(0.2)
    queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert len(queue) == 1, queue  # the train job
    subprocess.run(["scancel", queue[0]], check=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-2000:]
    assert not (wd / "results/tiny/training.json").exists()

    slurm_snakemake(wd)  # the same command again
    log = (wd / "logs/train/tiny.log").read_text()
    assert "resuming from work_dirs/tiny/iter_" in log
    assert json.loads((wd / "results/tiny/training.json").read_text())["resumed_from"] in (4, 8)
