"""Every rule has a pinned env, log and conda directive, written from pyproject.toml; each env holds what its
rule's step imports, and the step runs in it."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from snaketune import envfiles
from snaketune.config import LAYOUT

from .helpers import ROOT, TINY_CONFIG, XTUNER, missing, run


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
            assert REQUIREMENTS.get(name) == version, (
                f"{env.name}: {name}=={version}, requirements.txt has {REQUIREMENTS.get(name)}"
            )
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


# ---------------------------------------------------------------- generated from pyproject.toml


def pip_list(env: Path) -> list[str]:
    spec = yaml.safe_load(env.read_text())
    return next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)


def conda_list(env: Path) -> list[str]:
    return [d for d in yaml.safe_load(env.read_text())["dependencies"] if isinstance(d, str)]


def test_env_files_and_requirements_are_what_the_generator_writes():
    """Pins are written once, in pyproject.toml; a hand edit of an env file or requirements.txt, or a pin
    changed without running the generator, fails here."""
    for path, text in envfiles.expected().items():
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing: run python -m snaketune.envfiles"
        assert path.read_text() == text, f"{path.relative_to(ROOT)} differs: run python -m snaketune.envfiles"
    assert set(envfiles.RULES) == set(rules()), "envfiles.RULES names every rule of rules/*.smk, and only those"
    assert {p.stem for p in (ROOT / "envs").glob("*.yaml")} == set(envfiles.RULES), "an env file no rule uses"
    res = run([sys.executable, "-m", "snaketune.envfiles", "--check"], cwd=ROOT)
    assert res.returncode == 0 and not res.stderr


def test_a_pin_moved_in_pyproject_makes_the_files_it_reaches_stale(tmp_path):
    """A checkout whose pyproject.toml moved pandas: the report env and requirements.txt differ from what the
    generator writes, and no other file does."""
    root = tmp_path / "checkout"
    (root / "envs").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    for path, text in envfiles.expected().items():
        (root / path.relative_to(ROOT)).write_text(text)
    assert envfiles.expected(root) == {root / p.relative_to(ROOT): t for p, t in envfiles.expected().items()}
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pandas==3.1.1"', '"pandas==3.1.0"'))
    stale = {p.relative_to(root).as_posix() for p, t in envfiles.expected(root).items() if p.read_text() != t}
    assert stale == {"envs/report_experiment.yaml", "requirements.txt"}


def test_each_env_holds_what_its_rule_imports():
    """No training stack where a rule writes a JSON file: torch only where a model is loaded, DeepSpeed and
    tcmalloc only for train, PEFT not for fetching."""
    by_rule = {env.stem: set(pins_of(env)) for env in (ROOT / "envs").glob("*.yaml")}
    for rule in ("generate_data", "convert_data", "mix_data", "check_data", "report_experiment"):
        assert "torch" not in by_rule[rule], rule
    assert {"transformers", "sentencepiece", "protobuf"} <= by_rule["check_data"]
    assert "peft" not in by_rule["fetch_model"] and "torch" in by_rule["fetch_model"]
    for rule, names in by_rule.items():
        assert ("deepspeed" in names) == (rule == "train"), rule
        assert any(d.startswith("gperftools=") for d in conda_list(ROOT / "envs" / f"{rule}.yaml")) == (rule == "train")
    for rule in ("pth_to_hf", "merge", "evaluate", "replay_data", "export_gguf"):
        assert {"torch", "transformers", "peft"} <= by_rule[rule], rule
    assert "gguf" in by_rule["export_gguf"] and "bitsandbytes" not in by_rule["export_gguf"]


def pins_of(env: Path) -> dict[str, str]:
    return pins(pip_list(env))


# ---------------------------------------------------------------- importing costs no torch


LIGHT_SCRIPTS = ("generate_data", "convert_data", "mix_data", "check_data", "report")
IMPORT_CHAIN = """
import contextlib, io, runpy, sys
sys.path.insert(0, {scripts!r})
import snaketune, snaketune.steps, snaketune.cli, snaketune.config, snaketune.data, snaketune.datatools
for script in {names!r}:
    sys.argv = [script, "--help"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        runpy.run_path(f"{scripts}/{{script}}.py", run_name="__main__")
print(sorted(m for m in ("torch", "transformers", "peft", "deepspeed", "bitsandbytes", "gradio") if m in sys.modules))
"""


def test_importing_snaketune_and_the_light_scripts_costs_no_torch():
    """The package imports lazily: a data or report rule's script loads its module chain without torch."""
    code = IMPORT_CHAIN.format(scripts=str(ROOT / "scripts"), names=LIGHT_SCRIPTS)
    res = run([sys.executable, "-c", code], cwd=ROOT)
    assert res.stdout.strip() == "[]", res.stdout


# ---------------------------------------------------------------- each env built, its step run in it


def cpu_torch_links() -> str:
    """pip's find-links (``PIP_FIND_LINKS`` or ``pip config``) where a CPU torch wheel lies: without one, torch
    resolves to a multi-GB CUDA build, so the test does not build torch environments."""
    links = os.environ.get("PIP_FIND_LINKS")
    if not links:
        res = run([sys.executable, "-m", "pip", "config", "get", "global.find-links"], check=False)
        links = res.stdout.strip() if res.returncode == 0 else ""
    for link in links.split():
        if any(Path(link).glob("torch-*+cpu-*.whl")):
            return link
    missing(f"no CPU torch wheel in pip's find-links ({links or 'none configured'})")


def uv() -> str:
    found = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    if not found:
        missing("uv is not installed (pip install uv)")
    return found


def build_venv(uv_bin: str, env: Path, dest: Path, links: str) -> Path:
    """A fresh virtual environment holding exactly the env file's pip packages, in its Python; uv's cache is
    shared between builds. Conda-only packages (gperftools) have no pip counterpart and stay out."""
    python = next(d.split("=", 1)[1] for d in conda_list(env) if d.startswith("python="))
    run([uv_bin, "venv", "--quiet", "--seed", "--python", python, dest])
    # the project's pins as constraints: a package the file leaves out but another one needs still comes at
    # the project's version (never a CUDA torch from PyPI), and the check below names it
    run(
        [
            uv_bin,
            "pip",
            "install",
            "--quiet",
            "--python",
            dest / "bin" / "python",
            "--find-links",
            links,
            "--constraint",
            ROOT / "requirements.txt",
            *pip_list(env),
        ]
    )
    return dest / "bin" / "python"


# what the steps import from the training stack: where an env gets one, its file pins it
STACK = ("torch", "transformers", "peft", "bitsandbytes", "deepspeed")


def unpinned_stack(uv_bin: str, python: Path, env: Path) -> list[str]:
    frozen = pins(run([uv_bin, "pip", "freeze", "--python", python]).stdout.splitlines())
    return [f"{name}=={frozen[name]}" for name in STACK if name in frozen and name not in pins_of(env)]


# The tiny experiment as every data rule sees it: a generated, a converted and a replayed dataset (the
# talking model's answers: the fixture base answers nothing), mixed; a dozen general questions, not 170.
def chain_config(path: Path, talking: Path) -> Path:
    questions = path.parent / "questions.jsonl"
    general = (ROOT / "snaketune" / "evalsets" / "general.jsonl").read_text().splitlines(keepends=True)
    questions.write_text("".join(general[:12]))
    config = json.loads(json.dumps(TINY_CONFIG))
    config["models"]["talking"] = {"source": "local", "path": str(talking)}
    config["datasets"].update(
        {
            "xt": {"format": "xtuner", "path": str(XTUNER / "data.json")},
            "rp": {
                "generator": "replay",
                "spec": {
                    "model": "talking",
                    "template": "internlm2_chat",
                    "questions": str(questions),
                    "max_new_tokens": 6,
                },
            },
        }
    )
    tiny = config["experiments"]["tiny"]
    tiny["dataset"] = ["sc", "xt", {"name": "rp", "loss": "kl"}]
    tiny["train"].update(max_epochs=1, evaluation_freq=1000)
    tiny["evaluation"].update(general_questions=str(questions), general_max_new_tokens=4)
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


# Each rule's script by hand, in the order the workflow runs them (the defaults are the workflow's paths).
CHAIN = [
    "fetch_model",
    "generate_data",
    "convert_data",
    "replay_data",
    "mix_data",
    "check_data",
    "train",
    "pth_to_hf",
    "merge",
    "export_gguf",
    "evaluate",
    "report",
]
ARGS = {"train": ["--threads", "2"]}
SCRIPT_RULE = {"report": "report_experiment"}
# what a step imports only on a path the tiny run cannot take offline: hub datasets, downloads, GGUF import
ALSO_IMPORTS = {"convert_data": ["datasets"], "fetch_model": ["modelscope", "huggingface_hub", "gguf", "torch"]}


@pytest.mark.slow
def test_each_rule_runs_in_a_fresh_env_of_exactly_its_env_file(tmp_path):
    """For each env file, a virtual environment with exactly its pip packages; then the tiny experiment runs
    rule by rule, each rule's script in its own env, so an import its env lacks fails here. The InternLM2
    import (fetch_model's conversion) runs in the fetch env as well."""
    from .chat_model import build_talking_model
    from .internlm_layout import build_internlm2

    uv_bin, links = uv(), cpu_torch_links()
    started = time.monotonic()
    venvs = tmp_path / "venvs"
    pythons = {
        env.stem: build_venv(uv_bin, env, venvs / env.stem, links) for env in sorted((ROOT / "envs").glob("*.yaml"))
    }
    built = time.monotonic() - started
    for name, python in pythons.items():
        env_file = ROOT / "envs" / f"{name}.yaml"
        assert not unpinned_stack(uv_bin, python, env_file), f"{name}: pin {unpinned_stack(uv_bin, python, env_file)}"
        res = run([python, "-c", "import torch; print(torch.__version__)"], check=False)
        assert res.returncode != 0 or res.stdout.strip().endswith("+cpu"), f"{name}: torch {res.stdout.strip()}"
    for rule, modules in ALSO_IMPORTS.items():
        run([pythons[rule], "-c", f"import {', '.join(modules)}"])

    wd = tmp_path / "wf"
    wd.mkdir()
    talking = build_talking_model(tmp_path / "talking")
    config = chain_config(wd / "config.yaml", talking)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # DeepSpeed compiles its CPU op for each fresh env; in torch's shared extension cache that build would
    # replace the one of the project's own environment, which would then compile it again
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")
    args = {**ARGS, "replay_data": ["--model", talking]}
    for script in CHAIN:
        python, step_started = pythons[SCRIPT_RULE.get(script, script)], time.monotonic()
        run(
            [python, ROOT / "scripts" / f"{script}.py", "tiny", "--config", config, *args.get(script, [])],
            cwd=wd,
            env=env,
        )
        print(f"{script}: {time.monotonic() - step_started:.0f} s")
    layout = LAYOUT.format(exp="tiny", model="tiny_llama")
    for made in (
        layout.mixture,
        layout.summary,
        f"{layout.adapter}/adapter_config.json",
        f"{layout.merged}/config.json",
        layout.gguf_model.format(type="q4_0"),
        layout.evaluation_summary,
        layout.curves,
        layout.evaluation_page,
    ):
        assert (wd / made).is_file(), made

    internlm2 = build_internlm2(tmp_path / "internlm2").path
    run(
        [
            pythons["fetch_model"],
            ROOT / "scripts" / "fetch_model.py",
            "tiny",
            "--config",
            config,
            "--set",
            f"models.tiny_llama.path={internlm2}",
            "--output",
            tmp_path / "converted",
        ],
        cwd=wd,
        env=env,
    )
    assert (tmp_path / "converted" / "config.json").is_file()
    print(f"built {len(pythons)} envs in {built:.0f} s; whole test {time.monotonic() - started:.0f} s")


@pytest.mark.slow
def test_the_real_conda_envs_build_and_run_the_tiny_workflow(tmp_path):
    """Where conda or mamba is installed (and conda-forge reachable), Snakemake builds every rule's env from
    its file and runs the tiny workflow in them."""
    from .helpers import copy_workflow, snakemake

    if not (shutil.which("conda") or shutil.which("mamba")):
        pytest.skip(
            "no conda or mamba on PATH: the envs are built as virtual environments instead "
            "(test_each_rule_runs_in_a_fresh_env_of_exactly_its_env_file)"
        )
    wd = copy_workflow(tmp_path / "wf")
    (wd / "config" / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG, allow_unicode=True))
    env = dict(os.environ, CONDA_PKGS_DIRS=str(tmp_path / "pkgs"))
    snakemake(
        wd,
        "--sdm",
        "conda",
        "--conda-prefix",
        tmp_path / "conda-envs",
        "--conda-create-envs-only",
        "final_model",
        env=env,
    )
    snakemake(wd, "--sdm", "conda", "--conda-prefix", tmp_path / "conda-envs", "final_model", env=env)
    layout = LAYOUT.format(exp="tiny", model="tiny_llama")
    assert (wd / layout.evaluation_summary).is_file() and (wd / layout.merged / "config.json").is_file()
