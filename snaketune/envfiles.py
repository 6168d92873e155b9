"""Each rule's conda env (``envs/<rule>.yaml``) and ``requirements.txt``, written from pyproject.toml.

The pins live once, in pyproject.toml: ``[project] dependencies`` (what importing
snaketune needs) and the ``[project.optional-dependencies]`` groups (what the
steps import when they run). :data:`RULES` says which groups each rule's step
imports; its env file holds those and nothing else, so a rule that writes a
JSON file does not build a training stack. ``requirements.txt`` is the default
run in one environment: the ``all`` group.

    python -m snaketune.envfiles           # write envs/*.yaml and requirements.txt
    python -m snaketune.envfiles --check   # exit 1 naming each file that differs

Only the standard library: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib  # Python 3.11+: the generator is a maintainer's tool, run with the env files' Python
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = "3.11"

# rule -> the optional-dependency groups its script imports, directly or through the package
RULES: dict[str, list[str]] = {
    "generate_data": [],
    "convert_data": ["data"],
    "replay_data": ["model"],
    "mix_data": [],
    "check_data": ["tokenizer"],
    "fetch_model": ["fetch"],
    "train": ["train"],
    "pth_to_hf": ["export"],
    "merge": ["model"],
    "export_gguf": ["gguf"],
    "evaluate": ["model"],
    "report_experiment": ["report"],
}
# what only conda gives: the train step preloads tcmalloc where it is installed (train.allocator)
CONDA_ONLY: dict[str, list[str]] = {"train": ["gperftools=2.18.1"]}

SELF = re.compile(r"^snaketune\[([\w,\s-]+)\]$")
NOTICE = "# Written by `python -m snaketune.envfiles` from pyproject.toml; change the pins there."


def project(root: Path = ROOT) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]


def requirements(groups: list[str], proj: dict) -> list[str]:
    """The pinned requirements of the package and ``groups``, a group's own groups (``snaketune[x]``)
    expanded in place, each once, in the order pyproject.toml lists them."""
    out: list[str] = list(proj["dependencies"])
    extras = proj["optional-dependencies"]

    def add(group: str) -> None:
        if group not in extras:
            raise KeyError(f"pyproject.toml has no optional-dependency group {group!r}")
        for req in extras[group]:
            m = SELF.match(req)
            if m:
                for inner in m.group(1).split(","):
                    add(inner.strip())
            elif req not in out:
                out.append(req)

    for group in groups:
        add(group)
    return out


def env_file(rule: str, proj: dict) -> str:
    """The conda env of ``rule``: Python, pip, the conda-only packages and its groups' pins."""
    groups = RULES[rule]
    conda = [f"python={PYTHON}", *CONDA_ONLY.get(rule, []), "pip"]
    # no rule name in the file: rules with the same groups get the same file, which Snakemake builds once
    lines = [
        NOTICE,
        f"# groups: {', '.join(groups) or 'none (the package only)'}",
        "channels:",
        "  - conda-forge",
        "  - nodefaults",
        "dependencies:",
    ]
    lines += [f"  - {dep}" for dep in conda]
    lines += ["  - pip:"] + [f"      - {req}" for req in requirements(groups, proj)]
    return "\n".join(lines) + "\n"


def requirements_txt(proj: dict) -> str:
    header = [
        NOTICE,
        "# The default run in one environment (the `all` group): pip install -r requirements.txt -e .",
        "# torch resolves to the CPU wheel where pip offers one; on a GPU machine install the CUDA build",
        "# of the same version first (docs/gpu.md).",
    ]
    return "\n".join(header + requirements(["all"], proj)) + "\n"


def expected(root: Path = ROOT) -> dict[Path, str]:
    """Every generated file and what it should hold."""
    proj = project(root)
    files = {root / "envs" / f"{rule}.yaml": env_file(rule, proj) for rule in RULES}
    files[root / "requirements.txt"] = requirements_txt(proj)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snaketune.envfiles", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs")
    args = parser.parse_args(argv)
    files = expected()
    stale = [path for path, text in files.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(
                f"{path.relative_to(ROOT)} differs from pyproject.toml: run python -m snaketune.envfiles",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path in stale:
        path.write_text(files[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
