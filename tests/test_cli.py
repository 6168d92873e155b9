"""The command line's own manners: a version, and a mistyped command answered with the closest real one."""

import tomllib

import pytest

from .helpers import ROOT, run_cli


def test_version_is_the_projects():
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    res = run_cli("--version")
    assert res.stdout.strip() == f"snaketune {want}"


def test_a_mistyped_command_gets_the_closest_one_and_nothing_runs(tmp_path):
    res = run_cli("tran", "--config", tmp_path / "none.yaml", check=False, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == "snaketune: 'tran' is not a command. Did you mean 'train'? See 'snaketune --help'."
    assert list(tmp_path.iterdir()) == []  # no log, no work directory
    res = run_cli("zzzz", check=False, cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == "snaketune: 'zzzz' is not a command. See 'snaketune --help'."


def parsed(*argv: str) -> dict:
    from snaketune.cli import build_parser

    args = vars(build_parser().parse_args(list(argv)))
    # what differs is only how the command was named (and so the usage line its errors print)
    return {key: value for key, value in args.items() if key not in ("command", "conversion", "usage_error")}


def test_xtuners_convert_spellings_are_the_same_commands(tmp_path):
    pth_to_hf = ("iter_8.pth", "adapter", "--lora", "{r: 8, alpha: 16}", "--base-model", "base", "--fp32")
    assert parsed("convert", "pth_to_hf", *pth_to_hf) == parsed("pth_to_hf", *pth_to_hf)
    assert parsed("convert", "pth_to_hf", *pth_to_hf)["lora"] == {"r": 8, "alpha": 16}
    merge = ("base", "adapter", "merged", "--template", "internlm2_chat", "--max-shard-size", "1GB")
    assert parsed("convert", "merge", *merge) == parsed("merge", *merge)
    assert run_cli("convert", "--help").stdout.count("pth_to_hf") >= 2
    res = run_cli("convert", "split", "model", "out", "64GB", check=False, cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "ConfigError: snaketune has no `convert split`: pth_to_hf and merge already save in shards" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_lora_that_is_not_plain_yaml_is_a_usage_error(capsys):
    from snaketune.cli import main

    for value, problem in (("{r: [8", "expected ',' or ']'"), ("!!python/object/apply:os.system [ls]", "constructor")):
        with pytest.raises(SystemExit) as exit_:
            main(["pth_to_hf", "ckpt", "out", "--base-model", "b", "--lora", value])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err
        assert f"snaketune pth_to_hf: error: argument --lora: {value!r}: " in err and problem in err
