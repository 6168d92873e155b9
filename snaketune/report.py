"""The parts of ``snakemake --report``: training curves, evaluation answers, provenance, benchmarks.

Each function turns files the workflow already made into one self-contained
file (SVG or HTML) that the report embeds.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import pandas as pd

_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}</style>
</head><body><h2>{title}</h2>
{body}
</body></html>
"""


def _page(title: str, body: str, out: str | os.PathLike) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_PAGE.format(title=html.escape(title), body=body), encoding="utf-8")


def training_curves(metrics_jsonl: str | os.PathLike, out_svg: str | os.PathLike, *, title: str = "") -> None:
    """Loss, learning rate and gradient norm per optimizer step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.read_json(metrics_jsonl, lines=True)
    if df.empty:
        raise ValueError(f"{metrics_jsonl}: no training steps recorded")
    panels = [("loss", "loss (supervised tokens)"), ("lr", "learning rate"), ("grad_norm", "gradient norm")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 7), sharex=True)
    for ax, (column, label) in zip(axes, panels):
        ax.plot(df["step"], df[column], marker="." if len(df) < 50 else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(title or "training")
    fig.tight_layout()
    Path(out_svg).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_svg, format="svg", metadata={"Date": None})  # no date: the same run gives the same file
    plt.close(fig)


def evaluation_page(
    evaluation_jsonl: str | os.PathLike,
    summary_json: str | os.PathLike,
    out_html: str | os.PathLike,
    *,
    title: str = "",
) -> None:
    """The metrics (identity, leakage, retention, drift; thresholds), then the answers side by side:
    identity prompts, then general questions with whether each answer is correct."""
    from .evaluate import METRIC_COLUMNS, metrics_rows

    summary = json.loads(Path(summary_json).read_text())
    body = pd.DataFrame(metrics_rows(summary), columns=list(METRIC_COLUMNS)).to_html(index=False)
    df = pd.read_json(evaluation_jsonl, lines=True)
    sections = (
        (
            "identity",
            "Identity prompts",
            (
                "prompt",
                "in_training_data",
                "base",
                "finetuned",
                "base_claims_identity",
                "finetuned_claims_identity",
                "finetuned_stopped",
            ),
        ),
        (
            "general",
            "General questions (evaluation-only)",
            (
                "prompt",
                "accepted",
                "base",
                "base_correct",
                "finetuned",
                "finetuned_correct",
                "finetuned_claims_identity",
                "base_nll",
                "finetuned_nll",
                "answer_tokens",
            ),
        ),
    )
    for name, heading, wanted in sections:
        part = df[df["set"] == name]
        if len(part):
            columns = [c for c in wanted if c in part.columns]
            body += f"<h3>{heading}</h3>" + part[columns].to_html(index=False, na_rep="")
    _page(title or "evaluation", body, out_html)


def provenance_page(provenance_json: str | os.PathLike, out_html: str | os.PathLike, *, title: str = "") -> None:
    """provenance.json as a two-column table (dotted keys), with the JSON itself below."""
    record = json.loads(Path(provenance_json).read_text())
    flat = pd.json_normalize(record, sep=".").T.reset_index()
    flat.columns = ["key", "value"]
    body = (
        flat.to_html(index=False)
        + "<h3>provenance.json</h3><pre>"
        + html.escape(json.dumps(record, indent=1, ensure_ascii=False))
        + "</pre>"
    )
    _page(title or "provenance", body, out_html)


def benchmarks_page(benchmarks: list[str | os.PathLike], out_html: str | os.PathLike, *, title: str = "") -> None:
    """Snakemake's benchmark files (wall time, memory, I/O of each job) in one table, a row per job;
    the rule is the benchmark's folder (``benchmarks/<rule>/<name>.tsv``)."""
    frames = []
    for path in benchmarks:
        df = pd.read_csv(path, sep="\t")
        df.insert(0, "rule", Path(path).parent.name)
        df.insert(1, "file", str(path))
        frames.append(df)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    _page(title or "benchmarks", table.to_html(index=False, na_rep=""), out_html)
