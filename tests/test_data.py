"""Converters into XTuner's conversation format, validation errors, and the self-cognition generator."""

import json

import pytest

from snaketune.data import convert, convert_file, read_records, self_cognition, write_records
from snaketune.errors import DataError

from .helpers import XTUNER, run_cli, tiny_config


def conv(fmt, records, path="in.json"):
    return [r["conversation"] for r in convert(records, fmt, path)]


def test_alpaca_follows_xtuner_map_fn():
    recs = [
        {"instruction": "Add", "input": "1+1", "output": "2"},
        {"instruction": "Greet", "input": "", "output": "Hi"},
        {"instruction": "Nothing", "input": "", "output": "<nooutput>"},
    ]
    assert conv("alpaca", recs) == [
        [{"system": "", "input": "Add\n1+1", "output": "2"}],
        [{"system": "", "input": "Greet\n", "output": "Hi"}],  # the trailing newline stays, as in XTuner
    ]


def test_oasst1_splits_turns_and_drops_trailing_human():
    text = "### Human: Q1### Assistant: A1### Human: Q2### Assistant: A2### Human: dangling"
    assert conv("oasst1", [{"text": text}]) == [
        [{"system": "", "input": "Q1", "output": "A1"}, {"system": "", "input": "Q2", "output": "A2"}]
    ]


def test_openai_joins_users_skips_leading_assistant_and_keeps_loss_flag():
    msgs = [
        {"role": "assistant", "content": "ignored"},
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "A1", "loss": False},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    assert conv("openai", [{"messages": msgs}]) == [
        [
            {"system": "S", "input": "ab", "output": "A1", "output_with_loss": False},
            {"system": "", "input": "Q2", "output": "A2"},
        ]
    ]


def test_xtuner_fixture_data_validates():
    records = read_records(XTUNER / "data.json")
    out = list(convert(records, "xtuner", XTUNER / "data.json"))
    assert len(out) == 16 and out[0]["conversation"][0]["system"] == "你是青松的小助手。"


@pytest.mark.parametrize(
    "fmt, record, index, field",
    [
        ("xtuner", {"conversations": []}, 1, "conversation"),
        ("xtuner", {"conversation": [{"input": "q"}]}, 1, "conversation[0].output"),
        ("xtuner", {"conversation": [{"input": "q", "output": 3}]}, 1, "conversation[0].output"),
        (
            "xtuner",
            {"conversation": [{"input": "q", "output": "a", "output_with_loss": "yes"}]},
            1,
            "conversation[0].output_with_loss",
        ),
        ("xtuner", {"conversation": [{"input": "q", "output": "a", "output_with_loss": False}]}, 1, "conversation"),
        ("xtuner", {"conversation": [{"input": "q", "output": "a"}], "loss": "mse"}, 1, "loss"),
        ("xtuner", {"conversation": [{"system": "s", "input": "", "output": " "}]}, 1, "conversation[0]"),
        ("alpaca", {"input": "x", "output": "y"}, 1, "instruction"),
        ("oasst1", {"txt": "### Human: hi"}, 1, "text"),
        ("openai", {"messages": [{"role": "user"}]}, 1, "messages[0].content"),
        ("openai", {"messages": [{"role": "robot", "content": "x"}]}, 1, "messages[0].role"),
        ("openai", {"msgs": []}, 1, "messages"),
    ],
)
def test_malformed_record_names_file_record_field_and_fix(fmt, record, index, field):
    good = {
        "xtuner": {"conversation": [{"input": "q", "output": "a"}]},
        "alpaca": {"instruction": "i", "output": "o"},
        "oasst1": {"text": "### Human: q### Assistant: a"},
        "openai": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    }[fmt]
    with pytest.raises(DataError) as err:
        list(convert([good, record], fmt, "data/my.json"))
    msg = str(err.value)
    assert msg.startswith(f"data/my.json, record {index}, field '{field}'")
    assert "Fix:" in msg
    assert (err.value.index, err.value.field) == (index, field)


def test_jsonl_reader_names_the_bad_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"conversation": []}\n\n{oops\n')
    with pytest.raises(DataError, match=r"d.jsonl, record 1: line 3 is not valid JSON"):
        read_records(p)


def test_bad_json_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text("[1, 2")
    with pytest.raises(DataError, match="not valid JSON"):
        read_records(p)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_key_given_twice_names_file_record_and_key(tmp_path, suffix):
    """json keeps the last of two values without a word; the reader refuses the record instead."""
    good = '{"conversation": [{"input": "q", "output": "a"}]}'
    bad = '{"conversation": [{"input": "q", "output": "a", "input": "other"}]}'
    src = tmp_path / f"d{suffix}"
    src.write_text(f"[{good}, {bad}]" if suffix == ".json" else f"{good}\n{bad}\n")
    with pytest.raises(DataError) as err:
        read_records(src)
    assert str(err.value) == (
        f"{src}, record 1, field 'conversation[0].input': appears twice in one object. Fix: keep one of the two values"
    )
    out = tmp_path / "out.json"
    with pytest.raises(DataError):
        convert_file(str(src), "xtuner", out)
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_nesting_too_deep_to_read_is_one_line_naming_the_file(tmp_path, suffix):
    src = tmp_path / f"d{suffix}"
    src.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError) as err:
        read_records(src)
    message = err.value.one_line()
    assert message.startswith(f"{src}") and "nests arrays or objects too deeply" in message
    assert "\n" not in message


def test_failed_conversion_keeps_the_previous_output(tmp_path):
    """Bad input destroys nothing that was already made."""
    out = tmp_path / "out.json"
    src = tmp_path / "src.json"
    src.write_text(json.dumps([{"instruction": "i", "input": "", "output": "o"}]))
    assert convert_file(str(src), "alpaca", out) == 1
    before = out.read_text()
    src.write_text(json.dumps([{"instruction": "i", "output": "o"}, {"instruction": 5, "output": "o"}]))
    with pytest.raises(DataError, match="record 1, field 'instruction'"):
        convert_file(str(src), "alpaca", out)
    assert out.read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_jsonl_and_json_round_trip(tmp_path):
    recs = [{"conversation": [{"system": "", "input": "你好", "output": "hi"}]}]
    for name in ("a.json", "a.jsonl"):
        write_records(recs, tmp_path / name)
        assert read_records(tmp_path / name) == recs


def test_hub_dataset_offline_fails_with_the_local_way_out(tmp_path):
    config = tiny_config(tmp_path / "c.yaml", dataset={"format": "alpaca", "hub": "tatsu-lab/alpaca"})
    res = run_cli(
        "convert-data",
        "--config",
        config,
        "--output",
        tmp_path / "o.json",
        check=False,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        timeout=300,
    )
    assert res.returncode != 0
    assert "set the dataset's 'path' to the local file" in res.stderr
    assert not (tmp_path / "o.json").exists()


def test_self_cognition_answers_each_question_in_its_language():
    recs = self_cognition(
        name="Snaky",
        owner="青松",
        answers={"zh": "我是{owner}的小助手{name}", "en": "I am {name}"},
        questions={"zh": ["你是谁"], "en": ["Who are you?"]},
        copies=3,
        seed=1,
    )
    assert len(recs) == 6
    pairs = {(r["conversation"][0]["input"], r["conversation"][0]["output"]) for r in recs}
    assert pairs == {("你是谁", "我是青松的小助手Snaky"), ("Who are you?", "I am Snaky")}
    again = self_cognition(
        name="Snaky",
        owner="青松",
        answers={"zh": "我是{owner}的小助手{name}", "en": "I am {name}"},
        questions={"zh": ["你是谁"], "en": ["Who are you?"]},
        copies=3,
        seed=1,
    )
    assert recs == again  # seeded


def test_self_cognition_needs_an_answer_per_language():
    with pytest.raises(ValueError, match="answers.en"):
        self_cognition(name="n", owner="o", answers={"zh": "x"}, questions={"en": ["Who?"]})


def test_generate_data_cli_writes_valid_records(tmp_path):
    out = tmp_path / "sc.jsonl"
    spec = {"name": "N", "owner": "O", "answers": {"zh": "z {name}", "en": "e {name}"}, "copies": 2}
    config = tiny_config(tmp_path / "c.yaml", dataset={"generator": "self_cognition", "spec": spec})
    run_cli("generate-data", "--config", config, "--output", out)
    recs = read_records(out)
    assert len(recs) == 12 and all(list(convert([r], "xtuner", out)) for r in recs)
