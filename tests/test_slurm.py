"""The workflow on a real SLURM cluster (one node on loopback) through profiles/slurm."""

import copy
import json
import re
import subprocess
import time

import pytest
import yaml

from snaketune.checkpoints import COMPLETE
from snaketune.config import LAYOUT

from .helpers import SNAKEMAKE, TINY_CONFIG, copy_workflow, missing, run
from .slurm_cluster import Cluster, available, cpu_node_profile

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cluster():
    why = available()
    if why:
        missing(f"no SLURM cluster here: {why}")
    c = Cluster().start()
    yield c
    c.stop()


@pytest.fixture
def start():
    """Start Snakemake in the background; one still running when its test ends (failed) is killed."""
    procs = []

    def start(wd, *extra, target="final_model"):
        procs.append(
            subprocess.Popen(
                [*SNAKEMAKE, target, "--workflow-profile", "profiles/slurm", *extra],
                cwd=wd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def workflow(tmp_path, **train):
    wd = copy_workflow(tmp_path / "wf")
    config = copy.deepcopy(TINY_CONFIG)
    config["experiments"]["tiny"]["train"].update(train)
    (wd / "config" / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    cpu_node_profile(wd)
    return wd


def slurm_snakemake(wd, *extra, check=True, target="final_model"):
    return run([*SNAKEMAKE, target, "--workflow-profile", "profiles/slurm", *extra], cwd=wd, check=check, timeout=900)


# The fault tests need the training job only: the rest of the chain through sbatch is the first test's.
TRAINED = LAYOUT.summary.format(exp="tiny")


def submitted(output: str) -> dict[str, str]:
    """rule -> SLURM job id, from Snakemake's own report of each submission."""
    jobs = {}
    for m in re.finditer(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: ([^)]+)\)", output):
        rule = re.search(r"rule_(\w+?)(?:/|_wildcards)", m.group(2))
        jobs[rule.group(1) if rule else m.group(2)] = m.group(1)
    return jobs


def scontrol(jobid: str) -> dict[str, str]:
    """A job's record (kept MinJobAge=600 s after it ended), as KEY=VALUE pairs."""
    text = subprocess.run(["scontrol", "show", "job", jobid], capture_output=True, text=True, check=True).stdout
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


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
    # the profile's requests, as SLURM recorded them
    train, merge = scontrol(jobs["train"]), scontrol(jobs["merge"])
    # (without an accounting database SLURM lists GRES under TresPerJob, not TRES)
    assert train["TresPerJob"] == "gres:gpu:1" and train["TimeLimit"] == "12:00:00" and train["NumTasks"] == "1"
    assert train["CpusPerTres"] == "gres:gpu:2" and train["MinMemoryNode"] == "4000M"
    assert merge["MinMemoryNode"] == "4000M" and merge["TimeLimit"] == "00:30:00"
    assert (wd / "results/tiny/merged/config.json").exists()
    assert (wd / "results/tiny/evaluation.md").exists()
    assert "Nothing to be done" in (slurm_snakemake(wd).stdout + slurm_snakemake(wd).stderr)


def test_scancelled_training_resumes_when_resubmitted(cluster, start, tmp_path):
    wd = workflow(tmp_path)
    proc = start(wd, "--retries", "0", target=TRAINED)
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

    slurm_snakemake(wd, target=TRAINED)  # the same command again
    log = (wd / "logs/train/tiny.log").read_text()
    assert "resuming from work_dirs/tiny/iter_" in log
    assert json.loads((wd / "results/tiny/training.json").read_text())["resumed_from"] in (4, 8)


def test_walltime_kill_is_retried_with_more_time_and_resumes(cluster, start, tmp_path):
    """The profile's `retries: 2` and `runtime: 720 * attempt`: a train job killed by its walltime
    (here: its limit cut to one minute while it runs) is resubmitted with twice the time and resumes."""
    # SLURM kills a job between 60 and 90 s after its start once its limit is one minute: the training
    # must last well beyond that on a fast CPU (the tiny model does ~40 iterations/s on 2 cores: ~3 min)
    wd = workflow(tmp_path, max_epochs=1400, save_steps=100, evaluation_freq=100000)
    proc = start(wd, target=TRAINED)
    deadline = time.time() + 600
    while not (wd / "work_dirs/tiny/iter_100.pth" / COMPLETE).exists():
        assert proc.poll() is None and time.time() < deadline, "the workflow ended before the first checkpoint"
        time.sleep(0.2)
    (first,) = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    subprocess.run(["scontrol", "update", f"JobId={first}", "TimeLimit=1"], check=True)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert scontrol(first)["JobState"] == "TIMEOUT"
    train_jobs = [
        m.group(1)
        for m in re.finditer(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: [^)]*rule_train", out)
    ]
    assert len(train_jobs) == 2 and train_jobs[0] == first, out[-4000:]
    assert scontrol(train_jobs[1])["TimeLimit"] == "1-00:00:00"  # 720 * attempt 2 minutes
    summary = json.loads((wd / "results/tiny/training.json").read_text())
    assert summary["resumed_from"] and summary["resumed_from"] > 0
    assert "resuming from work_dirs/tiny/iter_" in (wd / "logs/train/tiny.log").read_text()
