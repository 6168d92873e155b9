"""The whole workflow through `snakemake`, as a user runs it, on the tiny model."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from snaketune import evalsets

from .helpers import (
    ROOT,
    SNAKEMAKE,
    TINY_BASE,
    TINY_CONFIG,
    assert_same_state,
    conda_on_path,
    copy_workflow,
    planned_rules,
    read_jsonl,
    run,
    snakemake,
)


def edit_config(wd: Path, change) -> None:
    """Change a workflow copy's config/config.yaml in place: ``change(cfg)``."""
    path = wd / "config/config.yaml"
    cfg = yaml.safe_load(path.read_text())
    change(cfg)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    """A user's clone: the workflow with the tiny config, committed to git."""
    wd = copy_workflow(tmp_path_factory.mktemp("wf"))
    (wd / "config" / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG, allow_unicode=True))
    git = ["git", "-C", str(wd), "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "tiny"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    return wd


@pytest.fixture(scope="module")
def finished(workflow) -> Path:
    snakemake(workflow, "final_model")
    return workflow


def test_dry_run_shows_every_step_and_why(workflow):
    res = snakemake(workflow, "-n", "final_model")
    assert planned_rules(res) == {
        "generate_data",
        "fetch_model",
        "check_data",
        "train",
        "pth_to_hf",
        "merge",
        "evaluate",
        "report_experiment",
        "final_model",
    }
    assert "reason: Missing output files" in res.stdout + res.stderr


@pytest.mark.slow
def test_final_model_builds_every_file(finished):
    wd = finished
    data = json.loads((wd / "results/data/generated/sc.json").read_text())
    assert len(data) == 12 and data[0]["conversation"][0]["output"]
    model = wd / "resources/models/tiny_llama"
    assert model.is_symlink() and model.resolve() == TINY_BASE.resolve()  # the tutorial's ln -s
    summary = json.loads((wd / "results/tiny/training.json").read_text())
    assert summary["iterations"] == 12 and summary["resumed_from"] is None
    ckpts = sorted(p.name for p in (wd / "work_dirs/tiny").glob("iter_*.pth"))
    assert ckpts == ["iter_12.pth", "iter_8.pth"]  # save_total_limit=2
    assert (wd / "work_dirs/tiny/last_checkpoint").read_text().endswith("iter_12.pth")
    check = (wd / "results/tiny/data_check.txt").read_text()  # check-custom-dataset ran before training
    assert check.startswith("results/data/generated/sc.json: 12 records, 12 valid, 0 invalid")
    assert "0 of 12 records have nothing to learn" in check and check.rstrip().endswith("OK")
    assert [r["iter"] for r in read_jsonl(wd / "work_dirs/tiny/eval_outputs.jsonl")] == [0, 6, 12]
    assert (wd / "results/tiny/adapter/adapter_model.safetensors").exists()
    merged = wd / "results/tiny/merged"
    assert (merged / "config.json").exists() and list(merged.glob("*.safetensors"))
    assert (
        "chat_template" in (merged / "tokenizer_config.json").read_text() or (merged / "chat_template.jinja").exists()
    )
    rows = read_jsonl(wd / "results/tiny/evaluation.jsonl")
    identity = [r for r in rows if r["set"] == "identity"]
    assert [r["prompt"] for r in identity] == ["你是谁", "Who are you?", "你是哪位？"]
    assert [r["in_training_data"] for r in identity] == [True, True, False]
    assert all(r["finetuned"] == r["base_plus_adapter"] for r in identity)
    # the general questions: the evaluation-only part of the shipped set, asked by default
    general = [r for r in rows if r["set"] == "general"]
    assert [r["prompt"] for r in general] == [q.question for q in evalsets.load("general", split="eval")]
    assert all(r["answer_tokens"] > 0 and r["base_nll"] > 0 for r in general)
    summary = json.loads((wd / "results/tiny/evaluation.json").read_text())
    assert {"identity_trained", "identity_heldout", "leakage", "retention", "nll", "thresholds"} <= set(summary)
    assert summary["identity_heldout"]["n"] == 1 and summary["leakage"]["n"] == len(general)
    md = (wd / "results/tiny/evaluation.md").read_text()
    assert "| prompt | in data | base | fine-tuned |" in md and "| likelihood drift (fine-tuned − base NLL) |" in md
    for rule in (
        "generate_data",
        "fetch_model",
        "check_data",
        "train",
        "pth_to_hf",
        "merge",
        "evaluate",
        "report_experiment",
    ):
        assert list((wd / "logs" / rule).glob("*.log")), f"no log for {rule}"
    for bench in (
        "generate_data/sc",
        "fetch_model/tiny_llama",
        "check_data/tiny",
        "train/tiny",
        "pth_to_hf/tiny",
        "merge/tiny",
        "evaluate/tiny",
    ):
        assert (wd / f"benchmarks/{bench}.tsv").exists(), bench


@pytest.mark.slow
def test_the_gguf_target_exports_the_finished_model_and_nothing_else(finished, tmp_path):
    """`snakemake gguf` after a finished run: only the export job runs, and writes a file per type, a Modelfile
    beside each and the adapter's LoRA GGUF (what is in them: tests/test_gguf.py)."""
    wd = tmp_path / "wf"
    shutil.copytree(finished, wd, symlinks=True)
    assert planned_rules(snakemake(wd, "-n", "gguf")) == {"export_gguf", "gguf"}
    snakemake(wd, "gguf")
    names = sorted(p.name for p in (wd / "results/tiny/gguf").iterdir() if p.name != ".snakemake_timestamp")
    kinds = ("f16", "q4_0", "q8_0")
    assert names == sorted(
        [*(f"tiny-{k}.gguf" for k in kinds), *(f"tiny-{k}.Modelfile" for k in kinds), "tiny-lora.gguf"]
    )
    assert planned_rules(snakemake(wd, "-n", "final_model")) == set()


@pytest.mark.slow
def test_second_run_does_nothing(finished):
    res = snakemake(finished, "-n", "final_model")
    assert planned_rules(res) == set()


@pytest.mark.slow
def test_changed_hyper_parameter_reruns_from_train_only(finished, tmp_path):
    wd = tmp_path / "wf"
    shutil.copytree(finished, wd, symlinks=True)
    edit_config(wd, lambda cfg: cfg["experiments"]["tiny"]["train"].update(lr=5e-4))
    res = snakemake(wd, "-n", "final_model")
    assert planned_rules(res) == {"train", "pth_to_hf", "merge", "evaluate", "report_experiment", "final_model"}
    # and the retraining does not resume from checkpoints made with the old lr
    snakemake(wd, "results/tiny/training.json")
    assert json.loads((wd / "results/tiny/training.json").read_text())["resumed_from"] is None
    assert list((wd / "work_dirs/tiny/superseded").glob("*/iter_12.pth"))
    assert "moved to" in (wd / "logs/train/tiny.log").read_text()


@pytest.mark.slow
def test_editing_a_script_comment_does_not_retrain(finished, tmp_path):
    """Both profiles leave `code` out of the rerun triggers (docs/workflow.md: "What re-runs")."""
    profiles = [yaml.safe_load((ROOT / f"profiles/{p}/config.yaml").read_text()) for p in ("default", "slurm")]
    assert (
        profiles[0]["rerun-triggers"] == profiles[1]["rerun-triggers"] == ["mtime", "params", "input", "software-env"]
    )
    wd = tmp_path / "wf"
    shutil.copytree(finished, wd, symlinks=True)
    with open(wd / "scripts/train.py", "a") as f:
        f.write("# a comment that changes nothing\n")
    assert planned_rules(snakemake(wd, "-n", "final_model")) == set()  # the default profile applies itself
    # the trigger left out is what would have retrained
    res = snakemake(wd, "-n", "final_model", "--rerun-triggers", "code")
    assert "train" in planned_rules(res) and "Code has changed since last execution" in res.stdout + res.stderr


def test_config_typo_fails_before_any_job(workflow, tmp_path):
    wd = tmp_path / "wf"
    shutil.copytree(workflow, wd, symlinks=True)
    edit_config(wd, lambda cfg: cfg["experiments"]["tiny"]["train"].update(learning_rate=1e-3))
    res = snakemake(wd, "-n", "final_model", check=False)
    assert res.returncode != 0 and "learning_rate" in res.stdout + res.stderr
    edit_config(
        wd,
        lambda cfg: (
            cfg["experiments"]["tiny"]["train"].pop("learning_rate"),
            cfg["experiments"]["tiny"].update(model="nope"),
        ),
    )
    res = snakemake(wd, "-n", "final_model", check=False)
    assert res.returncode != 0 and "experiments.tiny.model: no model named 'nope'" in res.stdout + res.stderr


def test_training_over_nodes_without_slurm_or_nnodes_stops_before_any_job(workflow, tmp_path):
    """nodes: 2 run locally without XTuner's variables: the run stops before its first job, saying what to set;
    a profile that gives another rule than train several nodes is refused, in a dry run too."""
    wd = copy_workflow(tmp_path / "wf")  # nothing made yet
    (wd / "config" / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG, allow_unicode=True))
    edit_config(wd, lambda cfg: cfg["experiments"]["tiny"].update(nodes=2))
    assert snakemake(wd, "-n", "final_model").returncode == 0  # the plan is shown
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "ADDR", "PORT")}
    res = run([*SNAKEMAKE, "--cores", "2", "final_model"], cwd=wd, env=env, check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "tiny: training over several nodes needs the SLURM executor" in out, out[-2000:]
    assert "NNODES, NODE_RANK, ADDR and PORT" in out and not (wd / "resources").exists()
    res = snakemake(workflow, "-n", "final_model", "--set-resources", "merge:nodes=2", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "merge: nodes=2: only the train rule spans nodes" in out, out[-2000:]
    # a profile's nodes for train comes with its task geometry, which the experiment's nodes sets itself
    res = snakemake(workflow, "-n", "final_model", "--set-resources", "train:nodes=2", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "train: nodes=2 needs tasks=2 and mpi=srun" in out, out[-2000:]
    ok = snakemake(workflow, "-n", "final_model", "--set-resources", "train:nodes=2", "train:tasks=2", "train:mpi=srun")
    assert ok.returncode == 0
    edit_config(wd, lambda cfg: cfg["experiments"]["tiny"].update(nodes=0))
    res = snakemake(wd, "-n", "final_model", check=False)
    assert res.returncode != 0 and "nodes" in res.stdout + res.stderr


def test_lint_is_clean():
    res = run([*SNAKEMAKE, "--lint"], cwd=ROOT)
    assert "Lints for" not in res.stdout + res.stderr


def test_snakefmt_is_clean():
    snakefmt = Path(sys.executable).parent / "snakefmt"
    run([snakefmt, "--check", "Snakefile", "rules"], cwd=ROOT)


def _embedded_files(report_html: str) -> dict[str, str]:
    """The files a self-contained Snakemake report embeds, by name: its `results` object holds each
    result's data URI."""
    import base64

    at = report_html.index("results = {") + len("results = ")
    results, _ = json.JSONDecoder().raw_decode(report_html, at)
    found = {}
    for res in results.values():
        header, payload = res["data_uri"].split(",", 1)
        assert header.endswith(";base64"), header
        found[res["filename"]] = base64.b64decode(payload).decode("utf-8")
    return found


@pytest.mark.slow
def test_report_shows_curves_answers_provenance_and_benchmarks(finished, tmp_path):
    report = tmp_path / "report.html"
    snakemake(finished, "--report", str(report), "final_model")
    files = _embedded_files(report.read_text())
    assert {"training_curves.svg", "evaluation.html", "provenance.html", "benchmarks.html"} <= set(files), list(files)
    curves = files["training_curves.svg"]
    assert curves.lstrip().startswith("<?xml") and "<svg" in curves
    for label in ("loss", "learning rate", "gradient norm", "optimizer step"):
        assert label in curves, label
    answers = files["evaluation.html"]
    for row in read_jsonl(finished / "results/tiny/evaluation.jsonl"):
        assert html_escape(row["prompt"]) in answers and html_escape(row["finetuned"]) in answers
    for metric in ("identity, held-out rephrasings", "leakage", "retention", "likelihood drift"):
        assert metric in answers, metric
    prov = json.loads((finished / "results/tiny/provenance.json").read_text())
    assert prov["data"]["sha256"] in files["provenance.html"] and prov["model"]["sha256"] in files["provenance.html"]
    bench = files["benchmarks.html"]
    for rule in ("fetch_model", "generate_data", "train", "pth_to_hf", "merge", "evaluate"):
        assert f"<td>{rule}</td>" in bench, rule
    assert "max_rss" in bench


def html_escape(text: str) -> str:
    """As pandas escapes table cells: &, < and >."""
    import html

    return html.escape(text, quote=False)


def test_containerize_names_every_env(tmp_path):
    """`snakemake --containerize` writes a Dockerfile that parses and creates every rule's env.

    The Dockerfile is Snakemake's real output; where conda is not installed, a stand-in answers
    the platform and version queries Snakemake makes before writing it (nothing is created)."""
    from dockerfile_parse import DockerfileParser

    env = conda_on_path(tmp_path)
    wd = copy_workflow(tmp_path / "wf")
    res = run([*SNAKEMAKE, "--containerize"], cwd=wd, env=env)
    parser = DockerfileParser(path=str(tmp_path / "Dockerfile"))
    parser.content = res.stdout
    instructions = [i["instruction"] for i in parser.structure]
    assert instructions[0] == "FROM" and parser.baseimage.startswith("condaforge/")

    envs = {f"envs/{e.name}" for e in (wd / "envs").glob("*.yaml")}
    hashed = {line.split()[-1].rstrip(".") for line in res.stderr.splitlines() if "Hashing conda environment" in line}
    # every rule's env file went into the image's hash; all rules declare one
    assert hashed == envs
    copies = {i["value"].split()[0]: i["value"].split()[1] for i in parser.structure if i["instruction"] == "COPY"}
    assert copies and set(copies) <= envs
    # identical env files are created once; each distinct content is created
    assert {(wd / c).read_text() for c in copies} == {(wd / e).read_text() for e in envs}
    runs = " ".join(i["value"] for i in parser.structure if i["instruction"] == "RUN")
    for target in copies.values():
        assert f"conda env create --prefix {Path(target).parent} --file {target}" in runs


def _training_job_pids(workdir: Path) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            # the job's script, or the same process once it started itself again on tcmalloc
            # (train.allocator: `python -m snaketune.rank_main`, same pid)
            train = "train.py" in cmd or "-m snaketune.rank_main" in cmd
            if p.info["cwd"] == str(workdir) and "snakemake" not in cmd.split(" ")[1:3] and train:
                pids.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


@pytest.mark.slow
def test_killed_training_job_resumes_through_snakemake(finished, tmp_path):
    """SIGKILL the training job mid-run; `snakemake -n` plans train; the same command resumes
    from the newest checkpoint and ends with the adapter of the uninterrupted run."""
    import signal
    import time

    from snaketune.checkpoints import COMPLETE
    from snaketune.lora_state import read_lora_state

    # the finished run's clone up to its training: the model and the checked data are there
    wd = tmp_path / "wf"
    shutil.copytree(finished, wd, symlinks=True)
    for done in (
        "work_dirs",
        "logs",
        *(p.relative_to(wd) for p in (wd / "results/tiny").iterdir() if p.name != "data_check.txt"),
    ):
        (shutil.rmtree if (wd / done).is_dir() else os.remove)(wd / done)
    cmd = [*SNAKEMAKE, "--cores", "2", "final_model"]
    proc = subprocess.Popen(cmd, cwd=wd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (wd / "work_dirs/tiny/iter_4.pth" / COMPLETE).exists():
        assert proc.poll() is None and time.time() < deadline, "the workflow ended before the first checkpoint"
        time.sleep(0.02)
    pids = _training_job_pids(wd)
    assert pids, "no training job process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0  # Snakemake saw its job die
    assert not (wd / "results/tiny/training.json").exists()

    plan = snakemake(wd, "-n", "final_model")
    assert "train" in planned_rules(plan)
    snakemake(wd, "final_model")
    log = (wd / "logs/train/tiny.log").read_text()
    assert "resuming from work_dirs/tiny/iter_" in log
    summary = json.loads((wd / "results/tiny/training.json").read_text())
    assert summary["resumed_from"] in (4, 8)
    ref = json.loads((finished / "results/tiny/training.json").read_text())
    a = read_lora_state(wd / "work_dirs/tiny" / Path(summary["checkpoint"]).name)
    b = read_lora_state(finished / "work_dirs/tiny" / Path(ref["checkpoint"]).name)
    assert_same_state(a, b)
    prov = json.loads((wd / "results/tiny/provenance.json").read_text())
    assert prov["resumed_from"] == [summary["resumed_from"]] and len(prov["runs"]) == 2


def test_provenance_records_a_dirty_tree_and_the_hash_of_its_changes(tmp_path):
    """A model made from edited workflow files says so in its provenance: ``dirty`` and the SHA-256 of
    ``git diff HEAD``, which tells two edits of one commit apart. Untracked files (results, logs) are no
    change."""
    from snaketune import provenance

    wd = copy_workflow(tmp_path / "wf")
    git = ["git", "-C", str(wd), "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "clean"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

    def recorded() -> dict:
        out = tmp_path / "provenance.json"
        provenance.write(
            out,
            config={},
            data_file=wd / "Snakefile",
            model_dir=TINY_BASE,
            workflow_dir=wd,
            seed=0,
            world_size=1,
            runs=[],
            device="cpu",
        )
        return json.loads(out.read_text())["workflow"]

    (wd / "results").mkdir()
    (wd / "results/evaluation.json").write_text("{}")
    assert recorded() == {"commit": head, "dirty": False}
    snakefile = wd / "Snakefile"
    snakefile.write_text(snakefile.read_text() + "# a local edit\n")
    diff = subprocess.run([*git, "diff", "HEAD", "--binary"], capture_output=True, check=True).stdout
    first = recorded()
    assert first == {"commit": head, "dirty": True, "diff_sha256": hashlib.sha256(diff).hexdigest()}
    snakefile.write_text(snakefile.read_text() + "# another edit\n")
    assert recorded()["diff_sha256"] not in (None, first["diff_sha256"])


@pytest.mark.slow
def test_provenance_records_what_the_model_was_made_from(finished):
    from snaketune.provenance import sha256_file

    prov = json.loads((finished / "results/tiny/provenance.json").read_text())
    assert prov["data"]["sha256"] == sha256_file(finished / "results/data/generated/sc.json")
    assert prov["config"]["train"]["lr"] == 1e-3 and prov["config"]["model_entry"]["source"] == "local"
    assert prov["seed"] == 0 and prov["world_size"] == 1
    assert prov["packages"]["torch"] and prov["packages"]["deepspeed"] and prov["packages"]["snaketune"]
    assert prov["runs"][0]["start"] and prov["runs"][0]["end"] and prov["resumed_from"] == []
    assert len(prov["model"]["sha256"]) == 64
    head = subprocess.run(["git", "-C", str(finished), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert prov["workflow"] == {"commit": head.stdout.strip(), "dirty": False}  # the clone's own commit
