"""Bad input and faults: the regression catalogue (docs/faults.md).

Each test is one case a hostile but fair user tried: a malicious or damaged
checkpoint, an unsafe name, a diverged training, a rerun that should retrain,
a failing job's log, a confusing message. Every one of them failed before the
fix it guards.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from snaketune.adapter import check_adapter, pth_to_hf
from snaketune.checkpoints import COMPLETE, complete_checkpoints, fingerprint
from snaketune.config import ExportConfig, LoraConfig, MergeConfig, ModelConfig, TrainConfig
from snaketune.data import read_records
from snaketune.errors import CheckpointError, ConfigError, DataError, NonFiniteWeights
from snaketune.lora_state import read_lora_state
from snaketune.merge import merge
from snaketune.provenance import model_hash, sha256_file

from .helpers import (
    TINY_BASE,
    TINY_CONFIG,
    XTUNER,
    assert_same_state,
    copy_workflow,
    interrupted_copy,
    missing,
    run_cli,
    snakemake,
    tiny_config,
    train_cmd,
    unequal_data,
)

LORA = LoraConfig(r=8, alpha=16, dropout=0.1)


def rerun(work: Path, out: Path, log: Path, **over) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(work, out, max_epochs=1, **over) + ["--log", str(log)], capture_output=True, text=True
    )


class Payload:
    """A pickle that runs code when loaded: it makes a directory."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.mkdir, (self.sentinel,)


def plant(path: Path, sentinel: Path, *, update_marker: bool) -> None:
    torch.save({"state": Payload(sentinel)}, path)
    if update_marker:  # the attacker rewrites the checksum too
        ckpt = path.parent
        marker = json.loads((ckpt / COMPLETE).read_text())
        marker["files"][path.name] = sha256_file(path)
        (ckpt / COMPLETE).write_text(json.dumps(marker))


RESUME_FILES = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_state_0.pt"]


# ---------------------------------------------------------------- security


@pytest.mark.parametrize("name", RESUME_FILES)
@pytest.mark.slow
def test_resume_never_runs_code_from_a_checkpoint(trained, tmp_path, name):
    """A __reduce__ payload in any file the resume path reads (checksum updated to match) is refused,
    naming the file; the payload never runs."""
    work, out = interrupted_copy(trained, tmp_path)
    sentinel = tmp_path / "PAYLOAD_RAN"
    plant(work / "iter_8.pth" / name, sentinel, update_marker=True)
    res = rerun(work, out, tmp_path / "train.log")
    assert res.returncode != 0
    assert not sentinel.exists(), "the checkpoint's code ran"
    assert f"iter_8.pth/{name}: refused to load" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_conversion_never_runs_code_from_a_checkpoint(trained, tmp_path):
    ckpt = tmp_path / "iter_8.pth"
    shutil.copytree(trained / "iter_8.pth", ckpt)
    sentinel = tmp_path / "PAYLOAD_RAN"
    plant(ckpt / "mp_rank_00_model_states.pt", sentinel, update_marker=True)
    with pytest.raises(Exception, match="refusing to load posix.mkdir"):
        pth_to_hf(ckpt, tmp_path / "adapter", LORA, str(TINY_BASE), ExportConfig())
    assert not sentinel.exists() and not (tmp_path / "adapter").exists()


def test_unsafe_experiment_name_is_refused_before_any_job(tmp_path):
    wd = copy_workflow(tmp_path / "wf")
    config = json.loads(json.dumps(TINY_CONFIG))
    config["experiments"]["../../escape"] = config["experiments"].pop("tiny")
    config["run"] = ["../../escape"]
    (wd / "config/config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    res = snakemake(wd, "final_model", check=False)
    assert res.returncode != 0
    assert "experiments.../../escape: a name may hold only letters, digits" in res.stdout + res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wf"]  # nothing written outside
    assert not (wd / "results").exists() and not (wd / "work_dirs").exists()


@pytest.mark.slow
def test_symlinked_checkpoint_is_refused_and_its_target_kept(trained, tmp_path):
    work, out = interrupted_copy(trained, tmp_path)
    elsewhere = tmp_path / "elsewhere" / "iter_8.pth"
    elsewhere.parent.mkdir()
    os.replace(work / "iter_8.pth", elsewhere)
    (work / "iter_8.pth").symlink_to(elsewhere, target_is_directory=True)
    for _ in range(2):  # and again: a failed run must not have damaged anything
        res = rerun(work, out, tmp_path / "train.log")
        assert res.returncode != 0 and "iter_8.pth is a symbolic link" in res.stderr
        assert (elsewhere / COMPLETE).is_file() and (elsewhere / "mp_rank_00_model_states.pt").is_file()


# ---------------------------------------------------------------- silent corruption


@pytest.mark.slow
def test_diverging_training_stops_with_a_clear_error(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out.json"
    res = subprocess.run(train_cmd(work, out, max_epochs=1, lr=1.0e6), capture_output=True, text=True)
    assert res.returncode != 0
    assert "TrainingDiverged: training diverged at iteration" in res.stderr and "Lower lr" in res.stderr
    assert not out.exists() and complete_checkpoints(work) == []  # nothing after the divergence was saved


def overwrite_64_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = os.urandom(64)
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def not_json(path: Path) -> None:
    path.write_text(path.read_text()[:-20])


# each kind of file a checkpoint holds, damaged in a different way
DAMAGES = [
    ("mp_rank_00_model_states.pt", "overwrite_64_bytes", "changed since it was written"),
    ("rng_state_0.pt", "truncate", "changed since it was written"),
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "payload", "changed since it was written"),
    (COMPLETE, "not_json", "is not valid JSON"),
]


def damage_file(target: Path, damage: str, sentinel: Path) -> None:
    if damage == "payload":
        plant(target, sentinel, update_marker=False)
    else:
        globals()[damage](target)


@pytest.mark.parametrize("name, damage, problem", DAMAGES)
@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(trained, tmp_path, name, damage, problem):
    """A file of the newest checkpoint changed after it was written (64 bytes of the weights, a truncated
    random state, a payload in the optimizer state without a matching checksum, a completion marker cut
    short): the rerun moves it aside, says which file, and resumes from the previous one, ending as an
    uninterrupted run does."""
    work, out = interrupted_copy(trained, tmp_path)
    target = work / "iter_8.pth" / name
    sentinel = tmp_path / "PAYLOAD_RAN"
    damage_file(target, damage, sentinel)
    log = tmp_path / "train.log"
    res = rerun(work, out, log)
    assert res.returncode == 0, res.stderr[-3000:]
    text = log.read_text()
    assert f"not resuming from {work / 'iter_8.pth'}: {target} {problem}" in text
    assert json.loads(out.read_text())["resumed_from"] == 4
    assert list((work / "corrupt").glob("*/iter_8.pth")) and not sentinel.exists()
    a, b = read_lora_state(trained / "iter_8.pth"), read_lora_state(work / "iter_8.pth")
    assert_same_state(a, b)


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_and_leaves_no_complete_checkpoint(tmp_path):
    """The work directory on a file system too small for one checkpoint: a 128 KiB tmpfs, mounted in a
    user and mount namespace of the test's own (``unshare -Urm``), so no root is needed and the disk
    fills for real. The save stops with one line naming the checkpoint and the reason; what it wrote
    has no completion marker, so no rerun resumes from it."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode:
        missing("unshare -Urm (user and mount namespaces) to mount a small tmpfs without root")
    work = tmp_path / "small"
    work.mkdir()
    mount_and_train = 'mount -t tmpfs -o size=128k tmpfs "$0" || exit 99; "$@"; rc=$?; find "$0" >"$0.files"; exit $rc'
    cmd = ["unshare", "-Urm", "sh", "-c", mount_and_train, str(work), *train_cmd(work, tmp_path / "out.json")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode not in (0, 99), res.stderr[-3000:]
    ckpt = work / "iter_4.pth"
    assert f"CheckpointError: writing checkpoint {ckpt} failed: no space left on device" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out.json").exists()
    written = (tmp_path / "small.files").read_text().split()
    assert f"{ckpt}/mp_rank_00_model_states.pt" in written and f"{ckpt}/{COMPLETE}" not in written


def test_the_completion_marker_covers_every_file_of_the_checkpoint(trained):
    for ckpt in (trained / "iter_4.pth", trained / "iter_8.pth"):
        listed = json.loads((ckpt / COMPLETE).read_text())["files"]
        on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != COMPLETE}
        assert set(listed) == on_disk and set(RESUME_FILES) <= on_disk
        assert all(listed[name] == sha256_file(ckpt / name) for name in listed)


@pytest.mark.parametrize("name, damage, problem", DAMAGES)
def test_conversion_verifies_the_checksums(trained, tmp_path, name, damage, problem):
    """Each kind of file, damaged: the conversion refuses the checkpoint, naming the file, and writes nothing."""
    ckpt = tmp_path / "iter_8.pth"
    shutil.copytree(trained / "iter_8.pth", ckpt)
    damage_file(ckpt / name, damage, tmp_path / "PAYLOAD_RAN")
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt / name} {problem}")):
        pth_to_hf(ckpt, tmp_path / "adapter", LORA, str(TINY_BASE), ExportConfig())
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "PAYLOAD_RAN").exists()


def test_pth_to_hf_merge_and_evaluation_refuse_non_finite_weights(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    from snaketune.model import load_base, load_peft_model

    state = read_lora_state(trained / "iter_8.pth")
    key = next(k for k in state if ".lora_B." in k)
    bad = {**state, key: torch.full_like(state[key], float("nan"))}
    with pytest.raises(NonFiniteWeights, match=f"hold NaN or infinity, e.g. {key}"):
        check_adapter(bad, "ckpt")
    adapter = tmp_path / "adapter"
    pth_to_hf(trained / "iter_8.pth", adapter, LORA, str(TINY_BASE), ExportConfig(fp32=True))
    weights = load_file(adapter / "adapter_model.safetensors")
    weights[key] = torch.full_like(weights[key], float("inf"))
    save_file(weights, adapter / "adapter_model.safetensors")
    with pytest.raises(NonFiniteWeights):
        merge(TINY_BASE, adapter, tmp_path / "merged", "internlm2_chat", MergeConfig())
    assert not (tmp_path / "merged").exists()
    with pytest.raises(NonFiniteWeights):  # what evaluate loads
        load_peft_model(load_base(TINY_BASE, "float32"), adapter)


# ---------------------------------------------------------------- reruns


@pytest.mark.slow
def test_rerun_of_a_finished_training_trains_again(trained, tmp_path):
    """`--forcerun train` (or any rerun of a finished training) starts over; the old checkpoints are
    set aside as superseded. A rerun after an interruption resumes (the tests above)."""
    work = tmp_path / "work"
    shutil.copytree(trained, work)
    log = tmp_path / "train.log"
    res = rerun(work, tmp_path / "out.json", log)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text())["resumed_from"] is None
    assert "had finished; training again from iteration 0" in log.read_text()
    assert sorted(p.name for p in work.glob("superseded/*/iter_*.pth")) == ["iter_4.pth", "iter_8.pth"]
    a, b = read_lora_state(trained / "iter_8.pth"), read_lora_state(work / "iter_8.pth")
    assert_same_state(a, b)  # the same training, run again


@pytest.mark.slow
def test_a_run_stopped_before_writing_its_results_resumes_rather_than_retrains(trained, tmp_path):
    """Training finished, but the run stopped before its results were written (Ctrl-C just then, or as
    here a summary whose directory cannot be made): the rerun resumes from the final checkpoint and
    trains nothing again, rather than taking the run for a finished one and training from iteration 0."""
    work, out = interrupted_copy(trained, tmp_path)  # the final checkpoint, and a run that never ended
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the summary's directory should be")
    res = subprocess.run(train_cmd(work, blocked / "out.json", max_epochs=1), capture_output=True, text=True)
    assert res.returncode != 0 and not (blocked.is_dir() or out.exists())
    log = tmp_path / "train.log"
    res = rerun(work, out, log)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(out.read_text())["resumed_from"] == 8
    assert "training again from iteration 0" not in log.read_text() and not (work / "superseded").exists()
    assert_same_state(read_lora_state(trained / "iter_8.pth"), read_lora_state(work / "iter_8.pth"))


def test_other_weights_with_the_same_config_are_another_model(tmp_path):
    """The resume fingerprint and the provenance hash the weights, not just config.json."""
    other = tmp_path / "model"
    shutil.copytree(TINY_BASE, other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    assert model_hash(other) != model_hash(TINY_BASE)
    cfg = TrainConfig(template="internlm2_chat")
    assert fingerprint(cfg, XTUNER / "data.json", other, 1) != fingerprint(cfg, XTUNER / "data.json", TINY_BASE, 1)


# ---------------------------------------------------------------- what the user is told


def workflow_on_local_data(tmp_path, records: str) -> tuple[Path, Path]:
    """A copy of the tiny workflow whose dataset is a local XTuner file holding ``records`` (JSON text)."""
    wd = copy_workflow(tmp_path / "wf")
    data = tmp_path / "data.json"
    data.write_text(records)
    config = json.loads(json.dumps(TINY_CONFIG))
    config["datasets"] = {"sc": {"format": "xtuner", "path": str(data)}}
    (wd / "config/config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    return wd, data


def test_a_failing_job_leaves_its_error_in_its_log(tmp_path):
    wd, bad = workflow_on_local_data(tmp_path, '[{"conversation": [{"input": "hi"}]}]')
    res = snakemake(wd, "results/data/converted/sc.json", check=False)
    assert res.returncode != 0
    log = (wd / "logs/convert_data/sc.log").read_text()
    assert f"DataError: {bad}, record 0, field 'conversation[0].output': missing" in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_data_with_nothing_to_learn_stops_the_workflow_before_training(tmp_path):
    """The check_data rule (check-custom-dataset) runs before train: every record is valid, but
    max_length leaves no supervised token, so the workflow stops there and keeps the data."""
    wd, _ = workflow_on_local_data(
        tmp_path, json.dumps([{"conversation": [{"input": " ".join(["word"] * 80), "output": "A"}]}] * 3)
    )
    res = snakemake(wd, "final_model", check=False)
    assert res.returncode != 0
    log = (wd / "logs/check_data/tiny.log").read_text()
    assert "DataError: results/data/converted/sc.json: no record has a supervised token within max_length 64" in log, (
        log
    )
    assert "3 of 3 records have nothing to learn" in log and "Traceback" not in log
    assert not (wd / "results/tiny/data_check.txt").exists() and not (wd / "logs/train").exists()
    assert len(json.loads((wd / "results/data/converted/sc.json").read_text())) == 3  # nothing destroyed


def test_non_utf8_data_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"conversation": [{"input": "a", "output": "b"}]}\n{"x": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=f"{path}: not UTF-8 text .*line 2.* Fix: save the file as UTF-8"):
        read_records(path)


def test_cli_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    config = tmp_path / "c.yaml"
    tiny_config(config, dataset={"format": "xtuner", "path": str(bad)})
    res = run_cli("convert-data", "--config", config, "--output", tmp_path / "o.json", check=False)
    assert res.returncode != 0 and f"DataError: {bad}: not valid JSON" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_gguf_file_names_the_key(tmp_path):
    from snaketune.fetch import fetch_model

    with pytest.raises(FileNotFoundError, match="gguf.path: .*nope.gguf does not exist"):
        fetch_model(
            ModelConfig(source="gguf", gguf={"path": str(tmp_path / "nope.gguf")}), tmp_path / "out", tmp_path / "cache"
        )
    assert not (tmp_path / "out").exists()


def test_model_needing_hub_code_names_the_setting(tmp_path):
    from snaketune.model import load_tokenizer

    model = tmp_path / "model"
    shutil.copytree(TINY_BASE, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="mystery", auto_map={"AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="set `trust_remote_code: true` on this model's entry"):
        load_tokenizer(model)


# ---------------------------------------------------------------- documented claims that had no test


@pytest.mark.slow
def test_resuming_on_another_world_size_is_refused_naming_both(trained, tmp_path):
    """docs/workflow.md, "Exact resume": ZeRO-2 splits the optimizer state by rank, so an interrupted training
    rerun on another number of ranks is refused before the model loads, naming both world sizes; its
    checkpoints stay where they are."""
    work, out = interrupted_copy(trained, tmp_path)
    before = sorted(p.name for p in work.glob("iter_*.pth"))
    log = tmp_path / "train.log"
    res = subprocess.run(
        train_cmd(work, out, max_epochs=1) + ["--ranks", "2", "--threads", "2", "--log", str(log)],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0
    text = log.read_text()
    assert "written by a training of world size 1 (1 rank); this one has world size 2" in text, text[-2000:]
    assert sorted(p.name for p in work.glob("iter_*.pth")) == before and not (work / "superseded").exists()
    assert not out.exists()


@pytest.mark.slow
def test_checkpoints_of_other_data_or_model_are_set_aside(trained, tmp_path):
    """docs/workflow.md, "Exact resume": checkpoints made from other data or another model are never
    resumed; they move to superseded/ and training starts from iteration 0."""
    other_model = tmp_path / "model"
    shutil.copytree(TINY_BASE, other_model)
    weights = other_model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # same config.json, other weights
    weights.write_bytes(bytes(data))
    cases = {
        "data": (["--data", str(unequal_data(tmp_path / "other.json"))]),
        "model": ["--model", str(other_model)],
    }
    for name, extra in cases.items():
        case = tmp_path / f"case_{name}"
        case.mkdir()
        work, out = interrupted_copy(trained, case)
        log = case / "train.log"
        res = subprocess.run(
            train_cmd(work, out, max_epochs=1) + extra + ["--log", str(log)], capture_output=True, text=True
        )
        assert res.returncode == 0, f"{name}: {res.stderr[-3000:]}"
        assert "checkpoints made with other settings, data, model or rank count moved to" in log.read_text(), name
        assert json.loads(out.read_text())["resumed_from"] is None, name
        assert sorted(p.name for p in work.glob("superseded/*/iter_*.pth")) == ["iter_4.pth", "iter_8.pth"], name


@pytest.mark.slow
def test_truncation_is_reported_in_the_log(tmp_path):
    log = tmp_path / "train.log"
    data = unequal_data(tmp_path / "unequal.json")
    subprocess.run(
        train_cmd(tmp_path / "w", tmp_path / "o.json", data=data, max_epochs=1, max_length=28) + ["--log", str(log)],
        check=True,
        capture_output=True,
    )
    assert re.search(r"\d+ samples were longer than max_length=28: \d+ tokens cut off", log.read_text())
    # and when max_length leaves no answer at all, the error says so
    res = subprocess.run(train_cmd(tmp_path / "w2", tmp_path / "o2.json", max_length=8), capture_output=True, text=True)
    assert res.returncode != 0 and "no record has a supervised token after encoding" in res.stderr
    assert "max_length=8" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_misaligned_save_steps_fall_on_window_ends(tmp_path):
    """save_steps=3 with accumulation 2: a multiple of 3 inside a window is saved at the window's end
    (iterations 4 and 6), and the last iteration (8) always."""
    work = tmp_path / "w"
    subprocess.run(
        train_cmd(work, tmp_path / "o.json", max_epochs=1, save_steps=3, save_total_limit=5),
        check=True,
        capture_output=True,
    )
    assert [n for n, _ in complete_checkpoints(work)] == [4, 6, 8]
