"""The command line's own manners: a version, and a mistyped command answered with the closest real one."""

import tomllib

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
