# Light, and where the results are: not worth a place in a cluster queue.
localrules:
    report_experiment,


rule report_experiment:
    """The parts of `snakemake --report`: training curves, evaluation answers, provenance, benchmarks."""
    input:
        metrics=LAYOUT.metrics,
        provenance=LAYOUT.provenance,
        evaluation=LAYOUT.answers,
        evaluation_summary=LAYOUT.evaluation_summary,
        benchmarks=experiment_benchmarks,
    output:
        curves=report(
            LAYOUT.curves,
            caption="../report/training_curves.rst",
            category="Training",
            labels={"experiment": "{exp}", "figure": "loss, lr, grad norm"},
        ),
        evaluation_page=report(
            LAYOUT.evaluation_page,
            caption="../report/evaluation.rst",
            category="Evaluation",
            labels={"experiment": "{exp}", "table": "base vs fine-tuned"},
        ),
        provenance_page=report(
            LAYOUT.provenance_page,
            caption="../report/provenance.rst",
            category="Provenance",
            labels={"experiment": "{exp}", "table": "provenance"},
        ),
        benchmarks_page=report(
            LAYOUT.benchmarks_page,
            caption="../report/benchmarks.rst",
            category="Benchmarks",
            labels={"experiment": "{exp}", "table": "benchmarks"},
        ),
    log:
        LAYOUT.log("report_experiment", "{exp}"),
    conda:
        "../envs/report_experiment.yaml"
    script:
        "../scripts/report.py"
