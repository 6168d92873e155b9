"""The experiment as one typed object: defaults in one place, references checked, overrides, the CLI."""

import dataclasses
import re

import pytest
import yaml

from snaketune import config as cfg
from snaketune.config import load, resolve
from snaketune.errors import ConfigError

from .helpers import ROOT, SNAKEMAKE, copy_workflow, read_jsonl, run, run_cli, snakemake, tiny_config

SCHEMA = yaml.safe_load((ROOT / "config/schema.yaml").read_text())
EXPERIMENT = SCHEMA["properties"]["experiments"]["additionalProperties"]["properties"]


def schema_sections():
    """(dataclass, the schema's properties for it) for every config section."""
    train = EXPERIMENT["train"]["properties"]
    return [
        (cfg.ModelConfig, SCHEMA["properties"]["models"]["additionalProperties"]["properties"]),
        (cfg.DatasetConfig, SCHEMA["properties"]["datasets"]["additionalProperties"]["properties"]),
        (cfg.TrainConfig, train),
        (cfg.LoraConfig, train["lora"]["properties"]),
        (cfg.ExportConfig, EXPERIMENT["export"]["properties"]),
        (cfg.MergeConfig, EXPERIMENT["merge"]["properties"]),
        (cfg.EvaluationConfig, EXPERIMENT["evaluation"]["properties"]),
        (cfg.GgufConfig, EXPERIMENT["gguf"]["properties"]),
        (cfg.ReplaySpec, SCHEMA["$defs"]["replay_spec"]["properties"]),
        (cfg.DatasetPart, SCHEMA["$defs"]["mixture_part"]["properties"]),
    ]


@pytest.mark.parametrize("cls,props", schema_sections(), ids=lambda x: getattr(x, "__name__", ""))
def test_schema_and_dataclasses_agree_on_keys_and_defaults(cls, props):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(fields) == set(props), f"{cls.__name__}: keys differ"
    for name, f in fields.items():
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            assert "default" not in props[name], name  # required: no default anywhere
            continue
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        if isinstance(default, tuple):
            default = list(default)
        if "default" in props[name] or default is not None:
            assert props[name].get("default") == default, f"{cls.__name__}.{name}"


def test_the_scalar_keys_of_an_experiment_agree_too():
    for f in dataclasses.fields(cfg._ExperimentRest):
        assert EXPERIMENT[f.name]["default"] == f.default
    sections = {"model", "dataset", *cfg.SECTIONS, *(f.name for f in dataclasses.fields(cfg._ExperimentRest))}
    assert set(EXPERIMENT) == sections


def test_resolve_applies_defaults_and_looks_up_references():
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    exp = resolve(config, "identity")
    assert exp.model_name == "smollm2_135m_instruct" and exp.model.source == "gguf"
    assert exp.datasets["self_cognition"].generated and exp.datasets["self_cognition"].spec["name"] == "Snaky"
    assert [p.name for p in exp.mixture] == ["self_cognition", "general_replay"] and exp.mixed
    assert exp.train.lr == 7e-4 and exp.train.lora.r == 16  # set in config.yaml
    assert exp.train.betas == (0.9, 0.999) and exp.train.lora.target_modules == "all-linear"  # defaults
    assert (
        exp.export.max_shard_size == "2GB"
        and exp.merge.dtype == "auto"
        and exp.evaluation.general_questions == "general"
    )
    assert exp.evaluation.batch_size == 64 and exp.evaluation.max_leakage_per_language == 0.05  # set in config.yaml


def test_unknown_keys_and_dangling_references_name_their_path():
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config["experiments"]["identity"]["train"]["lora"]["rank"] = 8
    with pytest.raises(ConfigError, match=r"experiments\.identity\.train\.lora: unknown key\(s\) rank"):
        resolve(config, "identity")
    config["experiments"]["identity"]["train"]["lora"].pop("rank")
    config["experiments"]["identity"]["dataset"] = "nope"
    with pytest.raises(ConfigError, match="experiments.identity.dataset: no dataset named 'nope'"):
        resolve(config, "identity")


@pytest.mark.parametrize("name", ["../../somewhere", "..", "a/b", "x y"])
def test_names_that_would_escape_the_tree_are_refused(name):
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config["experiments"][name] = config["experiments"].pop("identity")
    config["run"] = [name]
    with pytest.raises(ConfigError, match=f"experiments.{name}: a name may hold only"):
        cfg.check(config)


def test_set_overrides_are_relative_to_the_experiment_unless_rooted(tmp_path):
    path = tiny_config(tmp_path / "c.yaml")
    config, name = load(path, None, ["train.lr=1e-4", "train.lora={r: 4, alpha: 8}", "models.tiny.path=/m"])
    assert name == "tiny"
    exp = resolve(config, name)
    assert exp.train.lr == 1e-4 and (exp.train.lora.r, exp.train.lora.alpha) == (4, 8)
    assert exp.model.path == "/m"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load(path, None, ["train.lr"])


def test_cli_reads_the_config_with_overrides(tmp_path):
    spec = {"name": "N", "owner": "O", "answers": {"en": "I am {name}"}, "questions": {"en": ["Who?"]}, "copies": 2}
    path = tiny_config(tmp_path / "c.yaml", dataset={"generator": "self_cognition", "spec": spec})
    out = tmp_path / "d.jsonl"
    run_cli("generate-data", "--config", path, "tiny", "--set", "datasets.data.spec.copies=5", "--output", out)
    assert len(read_jsonl(out)) == 5
    # a typo in an override is caught by the schema, naming the key
    res = run_cli("generate-data", "--config", path, "--set", "train.learning_rate=1", "--output", out, check=False)
    assert res.returncode != 0 and "learning_rate" in res.stderr
    res = run_cli("generate-data", "--config", path, "nope", check=False)
    assert res.returncode != 0 and "no experiment named 'nope'" in res.stderr
    assert "Traceback" not in res.stderr  # our own errors are one clear line


def test_layout_is_the_workflows():
    """Every path is written once, in config.Layout: the rules take theirs from it, the CLI fills it in."""
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    exp = resolve(config, "identity")
    layout = cfg.Layout.of(exp)
    assert layout.model_dir == "resources/models/smollm2_135m_instruct"
    assert exp.data_file == layout.mixture == "results/data/mixed/identity/data.json"  # a mixture
    assert layout.mixture_sources == "results/data/mixed/identity/sources.json"
    config["experiments"]["identity"]["dataset"] = "self_cognition"  # one dataset: its own file
    assert resolve(config, "identity").data_file == "results/data/generated/self_cognition.json"
    assert layout.work_dir == "work_dirs/identity" and layout.adapter == "results/identity/adapter"
    assert layout.summary == "results/identity/training.json" and layout.merged == "results/identity/merged"
    assert cfg.LAYOUT.replay_data == "results/data/replay/{dataset}.json"
    assert cfg.LAYOUT.format(exp="identity").model_dir == "resources/models/{model}"  # others stay wildcards
    assert cfg.LAYOUT.log("train", "{exp}") == "logs/train/{exp}.log"
    assert cfg.LAYOUT.benchmark("fetch_model", "m") == "benchmarks/fetch_model/m.tsv"
    # the rules spell no path of their own
    rules = {p.name: p.read_text() for p in (ROOT / "rules").glob("*.smk")}
    for name, text in rules.items():
        assert not re.search(r"""["'](results|resources|work_dirs|logs|benchmarks)/""", text), name
    assert "LAYOUT.adapter" in rules["export.smk"] and "LAYOUT.summary" in rules["train.smk"]


def test_a_dataset_is_one_name_or_a_mixture():
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    entry = config["experiments"]["identity"]
    entry["dataset"] = "self_cognition"  # one dataset, as before mixtures
    exp = resolve(config, "identity")
    assert not exp.mixed and exp.data_jobs() == [("generate_data", "self_cognition")]
    assert exp.provenance_record()["dataset"] == "self_cognition"
    entry["dataset"] = ["self_cognition", {"name": "general_replay", "repeat": 0.5}]
    exp = resolve(config, "identity")
    assert exp.mixed and [(p.name, p.repeat) for p in exp.mixture] == [("self_cognition", 1.0), ("general_replay", 0.5)]
    assert exp.data_jobs() == [("generate_data", "self_cognition"), ("replay_data", "general_replay")]
    assert exp.provenance_record()["dataset"] == ["self_cognition", "general_replay"]
    entry["dataset"] = [{"name": "self_cognition", "repeat": 2}]  # a repeat alone makes a mixture file
    assert resolve(config, "identity").mixed
    entry["dataset"] = [{"name": "self_cognition", "loss": "kl"}]  # so does a loss (mix_data marks the records)
    assert resolve(config, "identity").mixed
    for bad, message in (
        (["self_cognition", "self_cognition"], "listed twice"),
        (["self_cognition", "nope"], "no dataset named 'nope'"),
        ([{"name": "self_cognition", "repeat": 0}], r"dataset\[0\]\.repeat: must be a number above 0"),
        ([{"name": "self_cognition", "times": 2}], r"unknown key\(s\) times"),
        ([{"name": "self_cognition", "loss": "mse"}], r"dataset\[0\]\.loss: 'mse'; choose one of ce, kl"),
        ([], "name at least one dataset"),
    ):
        entry["dataset"] = bad
        with pytest.raises(ConfigError, match=message):
            resolve(config, "identity")


def test_a_replay_dataset_names_a_model_that_exists():
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config["datasets"]["general_replay"]["spec"]["model"] = "nope"
    with pytest.raises(ConfigError, match="datasets.general_replay.spec.model: no model named 'nope'"):
        cfg.check(config)
    del config["datasets"]["general_replay"]["spec"]["template"]
    with pytest.raises(ConfigError, match=r"datasets.general_replay.spec: missing key\(s\) template"):
        cfg.check(config)


def test_cli_works_without_snakemake_and_provenance_without_git(tmp_path, monkeypatch):
    """The GPU machine has neither (bench/gpu_check.sh runs `snaketune train` there): the CLI then checks
    the config with the dataclasses alone, and provenance records an unknown commit instead of failing."""
    import subprocess
    import sys

    from snaketune.provenance import git_commit

    spec = {"name": "N", "owner": "O", "answers": {"en": "I am {name}"}, "questions": {"en": ["Who?"]}, "copies": 2}
    path = tiny_config(tmp_path / "c.yaml", dataset={"generator": "self_cognition", "spec": spec})
    out = tmp_path / "d.jsonl"
    code = (
        "import sys; sys.modules['snakemake'] = None; from snaketune.cli import main; "
        f"main(['generate-data', '--config', {path!r}, '--output', {str(out)!r}])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "snakemake is not installed" in res.stderr and len(read_jsonl(out)) == 2
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on it
    assert git_commit(ROOT) == {"commit": None, "dirty": None}


# ---------------------------------------------------------------- mistakes, each answered on one line


def snaketune_fails(capsys, *args) -> str:
    """``snaketune ARGS`` in this process, which must fail: the one line it logs (never a traceback)."""
    from snaketune.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if " ERROR " in line]
    return line.split(" ERROR snaketune: ", 1)[1]


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train=!!python/object/apply:os.system [echo hi]",
            "ConfigError: --set 'train=!!python/object/apply:os.system [echo hi]': could not determine a constructor "
            "for the tag 'tag:yaml.org,2002:python/object/apply:os.system' at line 1; write a plain YAML value",
        ),
        (
            "train.max_lenght=64",
            "ConfigError: --set 'train.max_lenght=64': experiments.tiny.train.max_lenght: unknown key 'max_lenght'; "
            "did you mean 'max_length'?",
        ),
        (
            "models.tiny.pathh=/m",
            "ConfigError: --set 'models.tiny.pathh=/m': models.tiny.pathh: unknown key 'pathh'; did you mean 'path'?",
        ),
        (
            "train.lr=abc",
            "ConfigError: --set 'train.lr=abc': experiments.tiny.train.lr: 'abc' is not of type 'number'",
        ),
        ("train.lr=.nan", "ConfigError: config errors: experiments.tiny.train.lr: nan is not a number a run can use"),
    ],
    ids=["python-tag", "typo", "rooted-typo", "type", "nan"],
)
def test_a_bad_override_is_one_line_naming_it_and_nothing_runs(capsys, tmp_path, override, message):
    path = tiny_config(tmp_path / "c.yaml")
    out = tmp_path / "out.json"
    line = snaketune_fails(capsys, "convert-data", "--config", path, "--set", override, "--output", out)
    assert line.startswith(message) and len(line) < 300  # not the schema, printed whole
    assert not out.exists()


def test_a_typo_in_the_file_names_the_file(capsys, tmp_path):
    path = tiny_config(tmp_path / "c.yaml", train={"template": "internlm2_chat", "warmup_ratoi": 0.1})
    line = snaketune_fails(capsys, "convert-data", "--config", path, "--output", tmp_path / "out.json")
    assert line == (
        f"ConfigError: {path}: experiments.tiny.train.warmup_ratoi: unknown key 'warmup_ratoi'; "
        "did you mean 'warmup_ratio'?"
    )


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_a_number_that_is_not_finite_is_refused_at_load(tmp_path, value):
    """NaN passes every bound of the schema (all comparisons with it are false) and stopped training
    only once it ran; any setting, also deep in a section, is checked before a job starts."""
    path = tmp_path / "c.yaml"
    tiny_config(path)
    path.write_text(
        path.read_text().replace("template: internlm2_chat", f"template: internlm2_chat\n      lr: {value}")
    )
    config, name = load(path, None, [f"evaluation.max_leakage={value}"])
    with pytest.raises(ConfigError) as err:
        resolve(config, name)
    shown = {".nan": "nan", ".inf": "inf", "-.inf": "-inf"}[value]
    assert f"experiments.tiny.train.lr: {shown} is not a number a run can use" in str(err.value)
    assert f"experiments.tiny.evaluation.max_leakage: {shown} is not a number" in str(err.value)


def test_a_config_file_that_is_not_plain_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: [tiny]\nmodels: !!python/object/apply:os.system [echo hi]\n")
    with pytest.raises(ConfigError, match=f"{path}: not a plain YAML config .* at line 2"):
        load(path)


def test_the_workflow_names_a_typo_in_its_config_on_one_line(tmp_path):
    """Snakemake's own schema check prints the schema whole; the workflow's names the key instead."""
    wd = copy_workflow(tmp_path / "wf")
    path = wd / "config/config.yaml"
    path.write_text(path.read_text().replace("      warmup_ratio:", "      warmup_ratoi:", 1))
    res = snakemake(wd, "-n", "final_model", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert (
        "config/config.yaml: experiments.identity.train.warmup_ratoi: unknown key 'warmup_ratoi'; "
        "did you mean 'warmup_ratio'?"
    ) in out
    assert "additionalProperties" not in out and len(out.splitlines()) < 15, out
    assert not (wd / "results").exists()


def test_the_workflow_reads_its_schema_beside_the_snakefile(tmp_path):
    """`snakemake -s WORKFLOW/Snakefile -d WORKDIR`, WORKDIR holding only its config: the schema is the
    workflow's own."""
    wd = copy_workflow(tmp_path / "wf")
    workdir = tmp_path / "workdir"
    (workdir / "config").mkdir(parents=True)
    (workdir / "config/config.yaml").write_text((wd / "config/config.yaml").read_text())
    res = run([*SNAKEMAKE, "-s", wd / "Snakefile", "-d", workdir, "-n", "final_model"], cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
