# Light, and where the results are: not worth a place in a cluster queue.
localrules:
    report_experiment,


rule report_experiment:
    """The parts of `snakemake --report`: training curves, evaluation answers, provenance, benchmarks."""
    input:
        metrics="results/{exp}/metrics.jsonl",
        provenance="results/{exp}/provenance.json",
        evaluation="results/{exp}/evaluation.jsonl",
        evaluation_summary="results/{exp}/evaluation.json",
        benchmarks=experiment_benchmarks,
    output:
        curves=report(
            "results/{exp}/report/training_curves.svg",
            caption="../report/training_curves.rst",
            category="Training",
            labels={"experiment": "{exp}", "figure": "loss, lr, grad norm"},
        ),
        evaluation=report(
            "results/{exp}/report/evaluation.html",
            caption="../report/evaluation.rst",
            category="Evaluation",
            labels={"experiment": "{exp}", "table": "base vs fine-tuned"},
        ),
        provenance=report(
            "results/{exp}/report/provenance.html",
            caption="../report/provenance.rst",
            category="Provenance",
            labels={"experiment": "{exp}", "table": "provenance"},
        ),
        benchmarks=report(
            "results/{exp}/report/benchmarks.html",
            caption="../report/benchmarks.rst",
            category="Benchmarks",
            labels={"experiment": "{exp}", "table": "benchmarks"},
        ),
    log:
        "logs/report_experiment/{exp}.log",
    conda:
        "../envs/report_experiment.yaml"
    script:
        "../scripts/report.py"
