# Config access and every input/params function of the workflow. The experiment is resolved
# once (snaketune.config: typed sections, defaults, cross-checks); each rule gets only its own
# section, as a plain dict that Snakemake compares between runs. Every path comes from LAYOUT
# (snaketune.config.Layout), which the CLI and the tests read too.
import os
from dataclasses import asdict
from functools import cache

from snakemake.exceptions import WorkflowError

from snaketune import config as st_config

st_config.check(config)

LAYOUT = st_config.LAYOUT

# The threads of the jobs that run a model (train, replay_data, evaluate): Snakemake caps them at
# --cores and sets OMP_NUM_THREADS to them, 1 for a rule that names none, and torch then uses one core.
MODEL_THREADS = 8


@cache
def resolved(name):
    return st_config.resolve(config, name)


def layout(wildcards):
    """The experiment's files."""
    return st_config.Layout.of(resolved(wildcards.exp))


def section(name):
    """params function: the experiment's `name` section (train, export, merge, evaluation)."""
    return lambda wc: asdict(getattr(resolved(wc.exp), name))


def lora(wildcards):
    return asdict(resolved(wildcards.exp).train.lora)


def template(wildcards):
    return resolved(wildcards.exp).train.template


def system_prompt(wildcards):
    return resolved(wildcards.exp).train.SYSTEM


def model_section(wildcards):
    return asdict(resolved(wildcards.exp).model)


def trust_remote_code(wildcards):
    return resolved(wildcards.exp).model.trust_remote_code


def provenance_record(wildcards):
    """What training is made from, for provenance.json (evaluation settings are left out so that
    editing a prompt does not retrain)."""
    return resolved(wildcards.exp).provenance_record()


def model_dir(wildcards):
    return layout(wildcards).model_dir


def work_dir(wildcards):
    return layout(wildcards).work_dir


def dataset_entry(name):
    return st_config.DatasetConfig.from_dict(
        config["datasets"][name], f"datasets.{name}"
    )


def experiment_data(wildcards):
    """The file train reads: the one dataset's, or the experiment's mixture."""
    return resolved(wildcards.exp).data_file


def mixture_sources(wildcards):
    """What went into a mixture (for provenance); nothing for a single dataset."""
    return [layout(wildcards).mixture_sources] if resolved(wildcards.exp).mixed else []


def mixture_inputs(wildcards):
    exp = resolved(wildcards.exp)
    return [st_config.dataset_file(p.name, exp.datasets[p.name]) for p in exp.mixture]


def mixture_parts(wildcards):
    return resolved(wildcards.exp).mixture_parts()


def train_seed(wildcards):
    return resolved(wildcards.exp).train.seed


def replay_spec(wildcards):
    return st_config.ReplaySpec.from_dict(
        dataset_entry(wildcards.dataset).spec, f"datasets.{wildcards.dataset}.spec"
    )


def replay_model(wildcards):
    """The model whose answers a replay dataset holds."""
    return LAYOUT.format(model=replay_spec(wildcards).model).model_dir


def inference_gpus(wildcards):
    """resources.gpu of evaluate: one GPU for an experiment trained on GPUs, none on a CPU."""
    return min(1, resolved(wildcards.exp).gpus)


def replay_gpus(wildcards):
    """resources.gpu of replay_data: one GPU where an experiment of the run trains on GPUs."""
    gpus = [resolved(name).gpus for name in config.get("run", [])]
    return min(1, max(gpus, default=0))


def replay_trust_remote_code(wildcards):
    model = replay_spec(wildcards).model
    return st_config.ModelConfig.from_dict(config["models"][model]).trust_remote_code


def dataset_params(wildcards):
    return asdict(dataset_entry(wildcards.dataset))


def dataset_local_input(wildcards):
    """A local source file is an input (editing it re-converts); a hub name is a parameter."""
    path = dataset_entry(wildcards.dataset).path
    return [path] if path else []


def model_params(wildcards):
    return asdict(st_config.ModelConfig.from_dict(config["models"][wildcards.model]))


def experiment_benchmarks(wildcards):
    """The benchmark file of every job an experiment's model is made by."""
    exp = resolved(wildcards.exp)
    steps = ["check_data"] + (["mix_data"] if exp.mixed else [])
    steps += ["train", "pth_to_hf", "merge", "evaluate"]
    return [
        LAYOUT.benchmark("fetch_model", exp.model_name),
        *(LAYOUT.benchmark(rule, name) for rule, name in exp.data_jobs()),
        *(LAYOUT.benchmark(step, wildcards.exp) for step in steps),
    ]


def final_outputs(names):
    """Per experiment: the merged model, its evaluation and the report's parts (and its GGUF files where
    gguf.enabled)."""
    outputs = []
    for name in names:
        files = LAYOUT.format(exp=name)
        outputs += [files.merged, files.evaluation, *files.report()]
        outputs += [files.gguf] if resolved(name).gguf.enabled else []
    return outputs


def gguf_outputs(names):
    """The GGUF files of each experiment."""
    return [LAYOUT.format(exp=name).gguf for name in names]


# ---------------------------------------------------------------- trainings over several nodes


def resource_value(rule_name, resource):
    """A resource a profile or --set-resources sets for a rule, or None."""
    value = workflow.resource_settings.overwrite_resources.get(rule_name, {}).get(
        resource
    )
    try:
        return getattr(value, "value", value)
    except (
        ValueError
    ):  # a string Snakemake evaluates only for a job (mpi=srun): as written
        return getattr(value, "raw", None)


def check_node_settings():
    """Only the train step spans nodes; any other asking for more than one fails at once."""
    for name in workflow.resource_settings.overwrite_resources:
        nodes = resource_value(name, "nodes")
        if name != "train" and isinstance(nodes, int) and nodes > 1:
            raise WorkflowError(
                f"set-resources: {name}: nodes={nodes}: only the train rule spans nodes; "
                f"remove nodes from {name}'s resources"
            )
    nodes = resource_value("train", "nodes")
    tasks, mpi = resource_value("train", "tasks"), resource_value("train", "mpi")
    if isinstance(nodes, int) and nodes > 1 and (tasks != nodes or mpi != "srun"):
        raise WorkflowError(
            f"set-resources: train: nodes={nodes} needs tasks={nodes} and mpi=srun beside it (one task "
            "per node, started by the job itself); or set nodes in the experiment, which sets all three"
        )


def trainings_over_nodes():
    """The run's experiments whose training spans several nodes (the profile's train nodes included)."""
    profile_nodes = resource_value("train", "nodes")
    if isinstance(profile_nodes, int) and profile_nodes > 1:
        return list(config.get("run", []))
    return [name for name in config.get("run", []) if resolved(name).nodes > 1]


check_node_settings()


def check_executor_for_nodes():
    """At the start of a run: a training over several nodes needs the SLURM executor or XTuner's
    variables. The executor is known only once the workflow starts (a dry run shows the plan).
    """
    several = trainings_over_nodes()
    executor = getattr(workflow.executor_plugin, "name", "local")
    if several and executor != "slurm" and not os.environ.get("NNODES"):
        raise WorkflowError(
            f"{', '.join(several)}: training over several nodes needs the SLURM executor "
            "(--workflow-profile profiles/slurm) or XTuner's NNODES, NODE_RANK, ADDR and PORT "
            f"set on each node (docs/cluster.md); this run uses the {executor} executor"
        )
