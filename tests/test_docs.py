"""The README and docs/ stay true: every command runs as printed, the configuration reference
matches config/schema.yaml, every cited result file exists, every `snaketune` subcommand is real."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from .helpers import ROOT, SNAKEMAKE, conda_on_path, copy_workflow, planned_rules, run, run_cli

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced_commands(text: str, languages: tuple[str, ...] = ("bash",)) -> list[str]:
    """The commands of a Markdown text's fenced blocks in ``languages``: continuation lines joined,
    comments and a leading ``$`` prompt dropped, blank lines skipped."""
    commands = []
    for block in re.findall(r"^```(\w*)\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        language, body = block
        if language not in languages:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            line = line.removeprefix("$ ")
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def doc_commands(program: str, languages: tuple[str, ...] = ("bash",)) -> list[tuple[str, str]]:
    """(doc, command) for every command that starts with ``program`` in README.md and docs/*.md."""
    return [
        (path.relative_to(ROOT).as_posix(), command)
        for path in DOCS
        for command in fenced_commands(path.read_text(), languages)
        if command.startswith(f"{program} ")
    ]


def test_the_parser_reads_continuations_comments_and_prompts():
    text = (
        "```bash\nsnakemake -n final_model   # the plan\nsnakemake a \\\n    b\n```\n"
        "```console\n$ snaketune list-cfg\nout\n```\n```python\nsnakemake = 1\n```\n"
    )
    assert fenced_commands(text) == ["snakemake -n final_model", "snakemake a      b"]
    assert fenced_commands(text, ("console",)) == ["snaketune list-cfg", "out"]


@pytest.mark.slow  # a Snakemake dry run per command
def test_every_snakemake_command_of_the_docs_runs_as_printed(tmp_path):
    """Every `snakemake` command of the README and docs/, exactly as printed, as a dry run (-n): none
    fails to parse or to plan (the cluster examples once lost their target to --set-resources)."""
    wd = copy_workflow(tmp_path / "wf")
    env = conda_on_path(tmp_path)  # --sdm conda asks conda about itself first, even in a dry run
    commands = doc_commands("snakemake")
    assert len(commands) >= 8
    for doc, command in commands:
        argv = shlex.split(command)[1:]
        if "--report" in argv or "--conda-create-envs-only" in argv:
            # not plans: one reports on a finished run (test_workflow.py::test_report_...), the other
            # creates conda envs even with -n (the env files: test_envs.py and test_containerize...)
            continue
        res = run([*SNAKEMAKE, *argv, "-n"], cwd=wd, env=env, check=False)
        assert res.returncode == 0, f"{doc}: {command}\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}"
        # the target rule is planned (final_model, or gguf); --omit-from plans what comes before the rule it
        # names: the target's jobs, less that rule's part
        assert planned_rules(res) & {"final_model", "gguf"} or "--omit-from" in argv, f"{doc}: {command}"


def commands_after(doc: Path, heading: str) -> list[str]:
    """The commands of the first ```bash block after a heading of a doc (:func:`fenced_commands`)."""
    text = doc.read_text()
    block = re.search(r"^```bash\n.*?^```", text[text.index(heading) :], re.DOTALL | re.MULTILINE)
    return fenced_commands(block.group(0))


@pytest.mark.slow  # a Snakemake dry run per preset
def test_preset_commands_plan_every_step_as_printed(tmp_path):
    """Each preset's header command and the GPU doc's preset command, exactly as printed, as a dry
    run: every step is planned (an earlier text put the target after --configfile, which took it
    for a config file)."""
    wd = copy_workflow(tmp_path / "wf")
    documented = [c for c in commands_after(ROOT / "docs/gpu.md", "## XTuner's presets") if c.startswith("snakemake ")]
    headers = [
        p.read_text().splitlines()[1].lstrip("# ").strip() for p in sorted((wd / "config/presets").glob("*.yaml"))
    ]
    assert len(documented) == 1 and len(headers) == 3
    for command in documented + headers:
        argv = shlex.split(command)
        assert argv[0] == "snakemake"
        res = run([*SNAKEMAKE, *argv[1:], "-n"], cwd=wd, check=False)
        assert res.returncode == 0, f"{command}\n{res.stderr[-3000:]}"
        assert planned_rules(res) == {
            "fetch_model",
            "convert_data",
            "check_data",
            "train",
            "pth_to_hf",
            "merge",
            "evaluate",
            "report_experiment",
            "final_model",
        }, command


def schema_keys(schema: dict) -> set[str]:
    """Every key config/schema.yaml defines, as a dotted path: ``<name>`` for a name the user picks
    (a model, dataset or experiment), ``[]`` for the entries of a list; $refs and the branches of
    oneOf and if/then followed."""
    defs = schema.get("$defs", {})
    keys: set[str] = set()

    def walk(node: dict, path: str) -> None:
        if "$ref" in node:
            walk(defs[node["$ref"].rsplit("/", 1)[1]], path)
        for name, sub in node.get("properties", {}).items():
            child = f"{path}.{name}" if path else name
            keys.add(child)
            walk(sub, child)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.<name>")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
        for branch in (*node.get("oneOf", []), *node.get("anyOf", []), *node.get("allOf", [])):
            walk(branch, path)
        if isinstance(node.get("then"), dict):
            walk(node["then"], path)

    walk(schema, "")
    return keys


def documented_keys(text: str) -> set[str]:
    """The keys of docs/configuration.md's reference tables: the first cell of each row, in backticks."""
    return set(re.findall(r"^\| `([^`]+)` \|", text, re.MULTILINE))


def test_the_configuration_reference_names_every_schema_key_and_no_other():
    schema = schema_keys(yaml.safe_load((ROOT / "config/schema.yaml").read_text()))
    documented = documented_keys((ROOT / "docs/configuration.md").read_text())
    assert {
        "run",
        "experiments.<name>.train.lora.r",
        "datasets.<name>.spec.unfinished",
        "experiments.<name>.dataset[].loss",
    } <= schema
    assert not schema - documented, (
        f"keys of config/schema.yaml missing in docs/configuration.md: {sorted(schema - documented)}"
    )
    assert not documented - schema, (
        f"keys in docs/configuration.md that config/schema.yaml lacks: {sorted(documented - schema)}"
    )


def test_every_cited_result_file_exists():
    cited = {
        (path.relative_to(ROOT).as_posix(), name)
        for path in DOCS
        for name in re.findall(r"bench/results/[\w.-]*\w", path.read_text())
    }
    assert any(doc == "docs/benchmarks.md" for doc, _ in cited)
    missing = sorted((doc, name) for doc, name in cited if not (ROOT / name).is_file())
    assert not missing, f"result files cited but not in bench/results/: {missing}"


def snaketune_subcommands() -> set[tuple[str, str]]:
    """(doc, subcommand) for every `snaketune SUB` in a command block, piped or not."""
    found = set()
    for path in DOCS:
        for command in fenced_commands(path.read_text(), ("bash", "console", "")):
            for sub in re.findall(r"(?:^|[|;&]\s*)snaketune\s+([A-Za-z_][\w-]*)", command):
                found.add((path.relative_to(ROOT).as_posix(), sub))
    return found


def test_every_snaketune_subcommand_in_the_docs_is_real():
    found = snaketune_subcommands()
    assert {sub for _, sub in found} >= {"chat", "web", "train", "pth_to_hf", "merge", "list-cfg"}
    for sub in sorted({sub for _, sub in found}):
        res = run_cli(sub, "--help", check=False)
        docs = sorted(doc for doc, s in found if s == sub)
        assert res.returncode == 0, f"`snaketune {sub}` ({', '.join(docs)}) is no subcommand:\n{res.stderr[-1500:]}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_link_only_to_files_that_exist(doc):
    """Relative Markdown links ([text](path)) point at files of the repository."""
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if "://" in target:
            continue
        assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to {target}, which does not exist"
