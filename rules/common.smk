# Config access and every input/params function of the workflow.
from pathlib import Path


def _check_references():
    """Fail before any job runs when names in the config point nowhere."""
    problems = []
    for name in config["run"]:
        if name not in config["experiments"]:
            problems.append(
                f"run: experiment {name!r} is not defined under experiments"
            )
    for name, e in config["experiments"].items():
        if e["model"] not in config["models"]:
            problems.append(
                f"experiments.{name}.model: no model named {e['model']!r} under models"
            )
        if e["dataset"] not in config["datasets"]:
            problems.append(
                f"experiments.{name}.dataset: no dataset named {e['dataset']!r} under datasets"
            )
    for name, d in config["datasets"].items():
        if "format" in d and not (d.get("path") or d.get("hub")):
            problems.append(
                f"datasets.{name}: a converted dataset needs 'path' (local file) or 'hub'"
            )
        if "generator" in d and "spec" not in d:
            problems.append(f"datasets.{name}: a generated dataset needs 'spec'")
    if problems:
        raise ValueError("config errors:\n  " + "\n  ".join(problems))


_check_references()


def experiment(wildcards):
    return config["experiments"][wildcards.exp]


def model_entry(wildcards):
    return config["models"][experiment(wildcards)["model"]]


def trust_remote_code(wildcards):
    return model_entry(wildcards).get("trust_remote_code", False)


def model_dir(wildcards):
    return f"resources/models/{experiment(wildcards)['model']}"


def data_rule(name):
    """Which job makes dataset `name` (generated, or converted from a file or hub)."""
    return (
        "generate_data" if "generator" in config["datasets"][name] else "convert_data"
    )


def dataset_file(name):
    kind = "generated" if data_rule(name) == "generate_data" else "converted"
    return f"results/data/{kind}/{name}.json"


def experiment_data(wildcards):
    return dataset_file(experiment(wildcards)["dataset"])


def dataset_source(wildcards):
    """A local source file is an input (editing it re-converts); a hub name is a parameter."""
    d = config["datasets"][wildcards.dataset]
    return d.get("path") or d["hub"]


def dataset_local_input(wildcards):
    d = config["datasets"][wildcards.dataset]
    return [d["path"]] if d.get("path") else []


def train_settings(wildcards):
    settings = dict(experiment(wildcards)["train"])
    settings["trust_remote_code"] = trust_remote_code(wildcards)
    return settings


def config_record(wildcards):
    """What training is made from, resolved, for provenance.json (evaluation settings are
    left out so that editing a prompt does not retrain)."""
    e = experiment(wildcards)
    return {
        "experiment": wildcards.exp,
        **{k: e[k] for k in ("model", "dataset", "gpus", "ranks", "train")},
        "model_entry": config["models"][e["model"]],
        "dataset_entry": config["datasets"][e["dataset"]],
    }


def experiment_benchmarks(wildcards):
    """The benchmark file of every job an experiment's model is made by."""
    e = experiment(wildcards)
    return [
        f"benchmarks/fetch_model/{e['model']}.tsv",
        f"benchmarks/{data_rule(e['dataset'])}/{e['dataset']}.tsv",
        *(
            f"benchmarks/{step}/{wildcards.exp}.tsv"
            for step in ("train", "pth_to_hf", "merge", "evaluate")
        ),
    ]


REPORT_PARTS = (
    "training_curves.svg",
    "evaluation.html",
    "provenance.html",
    "benchmarks.html",
)


def final_outputs(names):
    """Per experiment: the merged model, its evaluation and the report's parts."""
    return [
        out
        for name in names
        for out in (
            f"results/{name}/merged",
            f"results/{name}/evaluation.md",
            *(f"results/{name}/report/{part}" for part in REPORT_PARTS),
        )
    ]
