"""list-cfg, copy-cfg, check-custom-dataset and log-dataset, run as commands.

Expected counts follow from how the test data is built (records far longer
or far shorter than max_length); expected texts and ids are typed out from
XTuner's template strings.
"""

import json
import re

import pytest

from snaketune.cli import main

from .helpers import ROOT, TINY_BASE, tiny_config

BOS, EOS = 0, 2
PRESETS = sorted(
    p.removesuffix(".yaml") for p in (p.name for p in (ROOT / "config" / "presets").iterdir()) if p.endswith(".yaml")
)
CHATML = "<|im_start|>{role}\n{text}<|im_end|>\n"


def run(capsys, *args) -> tuple[int, str]:
    """``snaketune ARGS`` in this process: (exit code, stdout + stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def tok():
    from snaketune.model import load_tokenizer

    return load_tokenizer(TINY_BASE)


def experiment(tmp_path, records, fmt="xtuner", **train) -> str:
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records, ensure_ascii=False))
    return tiny_config(
        tmp_path / "config.yaml",
        dataset={"format": fmt, "path": str(data)},
        train={"template": "internlm2_chat", **train},
    )


# ---------------------------------------------------------------- presets


def test_list_cfg_lists_and_filters_the_presets(capsys):
    assert len(PRESETS) == 3
    assert run(capsys, "list-cfg") == (0, "\n".join(PRESETS) + "\n")
    code, out = run(capsys, "list-cfg", "-p", "CHAT_7b")
    assert (code, out.split()) == (0, ["internlm_chat_7b_qlora_oasst1_e3"])


def test_copy_cfg_copies_and_never_overwrites(capsys, tmp_path):
    name = PRESETS[0]
    assert run(capsys, "copy-cfg", name, tmp_path / "mine")[0] == 0
    copy = tmp_path / "mine" / f"{name}.yaml"
    assert copy.read_bytes() == (ROOT / "config" / "presets" / f"{name}.yaml").read_bytes()
    copy.write_text("# my edits\n")
    code, out = run(capsys, "copy-cfg", name, tmp_path / "mine")
    assert code == 1 and "exists" in out and copy.read_text() == "# my edits\n"
    code, out = run(capsys, "copy-cfg", "no_such_preset", tmp_path)
    assert code == 1 and name in out  # the error lists the known presets


@pytest.mark.parametrize("name", ["../config", "../../../config/config", "../presets/" + PRESETS[0], "/etc/hosts"])
def test_copy_cfg_copies_only_presets_by_name(capsys, tmp_path, name):
    """A path is no preset name, even one that leads to a YAML file (config/config.yaml, a preset itself)."""
    code, out = run(capsys, "copy-cfg", name, tmp_path / "mine")
    assert code == 1 and f"no preset named {name.removesuffix('.yaml')!r}; known: {', '.join(PRESETS)}" in out
    assert list(tmp_path.iterdir()) == []


def test_copy_cfg_never_writes_through_a_dangling_link(capsys, tmp_path):
    name = PRESETS[0]
    (tmp_path / "mine").mkdir()
    link = tmp_path / "mine" / f"{name}.yaml"
    link.symlink_to(tmp_path / "elsewhere.yaml")
    code, out = run(capsys, "copy-cfg", name, tmp_path / "mine")
    assert code == 1 and f"{link} exists; remove it or copy to another directory" in out
    assert not (tmp_path / "elsewhere.yaml").exists() and link.is_symlink()


# ---------------------------------------------------------------- check-custom-dataset


def test_check_reports_lengths_truncation_and_nothing_to_learn(capsys, tmp_path, monkeypatch, tok):
    monkeypatch.chdir(tmp_path)
    long = " ".join(["word"] * 100)  # 100 tokens: far beyond max_length 64
    records = (
        [{"conversation": [{"input": f"Question {i}?", "output": f"Answer {i}."}]} for i in range(4)]
        + [{"conversation": [{"input": "Tell a story.", "output": long}]} for _ in range(2)]
        + [{"conversation": [{"input": long, "output": "Short."}]}]
    )
    config = experiment(tmp_path, records, max_length=64)
    code, out = run(capsys, "check-custom-dataset", "--config", config)
    assert code == 0, out
    assert "7 records, 7 valid, 0 invalid" in out
    assert "3 of 7 records are longer than max_length 64" in out
    assert "1 of 7 records have nothing to learn" in out
    lengths = [
        1
        + len(
            tok.encode(
                CHATML.format(role="user", text=r["conversation"][0]["input"])
                + "<|im_start|>assistant\n"
                + r["conversation"][0]["output"]
                + "<|im_end|>\n",
                add_special_tokens=False,
            )
        )
        for r in records
    ]
    assert f"min {min(lengths)}," in out and f"max {max(lengths)}" in out
    bars = re.findall(r"^\s+\d+-\d+\s+\| #* (\d+)$", out, re.MULTILINE)
    assert len(bars) > 1 and sum(map(int, bars)) == 7
    assert out.rstrip().endswith("OK")


def test_check_names_file_record_and_field_of_bad_records_and_fails(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "alpaca.json"
    bad.write_text(
        json.dumps(
            [
                {"instruction": "Say hi", "output": "hi"},
                {"instruction": "No output"},
                {"instruction": "Number", "output": 3},
                ["not", "an", "object"],
                {"instruction": "Dropped, as XTuner drops it", "output": "<nooutput>"},
            ]
        )
    )
    config = experiment(tmp_path, [{"conversation": [{"input": "Q", "output": "A"}]}])
    code, out = run(capsys, "check-custom-dataset", "--config", config, "--data", bad, "--format", "alpaca")
    assert code == 1
    assert "5 records, 1 valid, 3 invalid, 1 dropped" in out
    assert f"{bad}, record 1, field 'output': missing" in out
    assert f"{bad}, record 2, field 'output': is a int, not a string" in out
    assert f"{bad}, record 3: is a list, not an object" in out
    assert "BAD DATA" in out


def test_check_refuses_a_turn_with_neither_input_nor_output(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = [{"conversation": [{"input": "Q", "output": "A"}]}, {"conversation": [{"input": "", "output": ""}]}]
    config = experiment(tmp_path, records)
    code, out = run(capsys, "check-custom-dataset", "--config", config)
    data = tmp_path / "data.json"
    assert code == 1 and "2 records, 1 valid, 1 invalid" in out
    assert f"INVALID {data}, record 1, field 'conversation[0]': input and output are both empty." in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "data.json"]  # nothing written


def test_check_fails_when_nothing_can_be_learned(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = experiment(
        tmp_path, [{"conversation": [{"input": " ".join(["word"] * 100), "output": "A"}]}], max_length=32
    )
    code, out = run(capsys, "check-custom-dataset", "--config", config)
    assert code == 1 and "1 of 1 records have nothing to learn" in out and "nothing to train on" in out


# ---------------------------------------------------------------- log-dataset


def test_log_dataset_marks_exactly_the_supervised_tokens(capsys, tmp_path, monkeypatch, tok):
    monkeypatch.chdir(tmp_path)
    records = [
        {
            "conversation": [
                {"system": "S", "input": "Q1", "output": "A1", "output_with_loss": False},
                {"input": "Q2", "output": "A2"},
            ]
        },
        {"conversation": [{"input": "Q3", "output": "A3"}]},
    ]
    config = experiment(tmp_path, records)
    code, out = run(capsys, "log-dataset", "--config", config)
    assert code == 0
    assert out.count(", record ") == 1  # -n 1 by default
    assert (
        "<|endoftext|>"
        + CHATML.format(role="system", text="S")
        + CHATML.format(role="user", text="Q1")
        + "<|im_start|>assistant\nA1<|im_end|>\n"  # output_with_loss false: not supervised
        + CHATML.format(role="user", text="Q2")
        + "<|im_start|>assistant\n⟦A2<|im_end|>⟧\n"
    ) in out

    code, out = run(
        capsys, "log-dataset", "--config", config, "--set", "train.template=default", "-n", 2, "--show", "all"
    )
    assert out.count(", record ") == 2
    assert "<|endoftext|><|User|>:Q3\n<|Bot|>:⟦A3<|im_end|>⟧\n" in out  # default: EOS appended, supervised
    ids = [BOS] + tok.encode("<|User|>:Q3\n<|Bot|>:", add_special_tokens=False)
    answer = tok.encode("A3", add_special_tokens=False) + [EOS]
    newline = tok.encode("\n", add_special_tokens=False)
    assert str(ids + answer + newline) in out
    assert str([-100] * len(ids) + answer + [-100] * len(newline)) in out
    assert all(f"-------- {view} --------" in out for view in ("text", "masked_text", "input_ids", "labels"))
