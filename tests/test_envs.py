"""Every rule has a pinned env, log and conda directive; env files agree with requirements.txt."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

from .helpers import ROOT


def pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s#;]+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


REQUIREMENTS = pins((ROOT / "requirements.txt").read_text().splitlines())
RULE_RE = re.compile(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", re.S | re.M)


def rules() -> dict[str, str]:
    out = {}
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        for name, body in RULE_RE.findall(smk.read_text()):
            out[name] = body
    return out


def test_every_job_rule_has_its_own_pinned_env_and_a_log():
    found = rules()
    assert {"generate_data", "convert_data", "fetch_model", "train", "pth_to_hf", "merge", "evaluate"} <= set(found)
    for name, body in found.items():
        m = re.search(r'conda:\s*\n\s*"\.\./envs/([\w-]+\.yaml)"', body)
        assert m, f"rule {name} has no conda: directive"
        assert m.group(1) == f"{name}.yaml", f"rule {name} should use envs/{name}.yaml"
        assert "log:" in body, f"rule {name} has no log:"


def test_env_pins_agree_with_requirements():
    for env in sorted((ROOT / "envs").glob("*.yaml")):
        spec = yaml.safe_load(env.read_text())
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
        env_pins = pins(pip)
        assert env_pins, f"{env.name} pins nothing"
        for name, version in env_pins.items():
            assert REQUIREMENTS.get(name) == version, f"{env.name}: {name}=={version}, requirements.txt has {REQUIREMENTS.get(name)}"
        unpinned = [d for d in pip if not d.startswith("-") and "==" not in d]
        assert not unpinned, f"{env.name}: unpinned {unpinned}"
        # each env file stands alone (Snakemake copies it alone into a container): no path, no
        # editable install; jobs import this checkout's package through scripts/_workflow.py
        assert not [d for d in pip if d.startswith("-") or ".." in d], f"{env.name} refers to files beside it"


def test_every_script_imports_the_checkouts_package_first():
    for path in sorted((ROOT / "scripts").glob("[!_]*.py")):
        imports = [line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
        first_snaketune = next(i for i, line in enumerate(imports) if re.match(r"(from|import) snaketune\b", line))
        assert any(line.startswith("import _workflow") for line in imports[:first_snaketune]), path.name


def test_every_script_runs_by_hand_with_help(tmp_path):
    """Each `scripts/<rule>.py` is also a shell command: `--help` prints its usage, from any directory."""
    scripts = sorted((ROOT / "scripts").glob("[!_]*.py"))
    used = {m for body in rules().values() for m in re.findall(r'script:\s*\n\s*"\.\./scripts/(\w+\.py)"', body)}
    assert used and used <= {s.name for s in scripts}
    for path in scripts:
        res = subprocess.run([sys.executable, str(path), "--help"], cwd=tmp_path, capture_output=True, text=True)
        assert res.returncode == 0, f"{path.name} --help: {res.stderr[-2000:]}"
        assert res.stdout.startswith("usage: snaketune "), res.stdout[:200]
