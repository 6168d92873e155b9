"""What fine-tuning gained and what it cost: base vs fine-tuned answers, metrics, thresholds, export checks.

Two sets of prompts, each answered greedily by the base and the fine-tuned model:

- the identity prompts (``evaluation.prompts``), trained ones and held-out
  rephrasings (a prompt is "trained" when it is a user input of the training
  data); they are also answered by base + adapter, which the merged model must
  match word for word (the export check);
- the evaluation-only part of a general question set (``general_questions``):
  leakage, retention, and the likelihood drift of the base model's own answers
  (:mod:`snaketune.metrics`). These are answered by the base and the merged
  model only: the adapter check needs no second pass over them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from . import metrics
from .config import EvaluationConfig
from .errors import CheckFailed
from .generation import answer_nll, generate_answers

log = logging.getLogger(__name__)


def evaluate(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    merged_dir: str | os.PathLike,
    evaluation: EvaluationConfig,
    *,
    template: str,
    system: str = "",
    trained_prompts: set[str] = frozenset(),
    trust_remote_code: bool = False,
    gpus: int | None = None,
    out_jsonl: str | os.PathLike,
    out_md: str | os.PathLike,
    out_summary: str | os.PathLike,
) -> dict:
    """Answer, measure, write ``out_jsonl`` (one row per prompt), ``out_md`` and ``out_summary``
    (the metrics), then fail if an export check or a configured threshold is not met. The models
    answer on the job's GPU when it was given one (``gpus``; None, by hand: any visible)."""
    from . import evalsets
    from .data import write_records
    from .files import write_json, write_text

    questions = evalsets.load(evaluation.general_questions, split="eval") if evaluation.general_questions else []
    seen = {metrics.normalise(p) for p in trained_prompts}
    refuse_leaked(questions, seen, evaluation)
    answers = answer_both(
        base_dir,
        adapter_dir,
        merged_dir,
        evaluation,
        questions,
        template=template,
        system=system,
        trust_remote_code=trust_remote_code,
        gpus=gpus,
    )
    keywords = evaluation.identity_keywords
    identity_rows = identity_table(answers, seen, keywords)
    general_rows = general_table(questions, answers, keywords)
    summary: dict[str, Any] = metrics.summarize(identity_rows, general_rows)
    summary["thresholds"] = metrics.check_thresholds(
        metrics.headline(summary), {setting: getattr(evaluation, setting) for setting in metrics.SETTINGS}
    )
    summary["general_questions"] = evaluation.general_questions
    table = markdown(identity_rows, general_rows, summary, keywords)
    write_records(identity_rows + general_rows, out_jsonl)
    write_text(out_md, table)
    write_json(out_summary, summary)
    log.info("evaluation: %s", {k: v for k, v in metrics.headline(summary).items()})
    problems = check_problems(identity_rows, summary, evaluation)
    if problems:
        # Snakemake deletes the outputs of a failed job: keep the answers and metrics in the log.
        log.error("the evaluation:\n%s", table)
        raise CheckFailed(
            "evaluation checks failed:\n- " + "\n- ".join(problems),
            hint="the answers and metrics are in this log; docs/evaluation.md explains each check",
        )
    return summary


def refuse_leaked(questions: list, seen: set[str], evaluation: EvaluationConfig) -> None:
    """Checked before any model is loaded: a contaminated measure is no measure."""
    leaked = [q.question for q in questions if metrics.normalise(q.question) in seen]
    if leaked:
        raise CheckFailed(
            f"{len(leaked)} evaluation-only question(s) of {evaluation.general_questions} are in the "
            f"training data: {leaked[:5]}. Remove those records from the training data "
            "(evaluation-only questions must never be trained on)"
        )


def answer_both(
    base_dir,
    adapter_dir,
    merged_dir,
    evaluation: EvaluationConfig,
    questions: list,
    *,
    template: str,
    system: str,
    trust_remote_code: bool,
    gpus: int | None = None,
) -> dict[str, list]:
    """Every answer the evaluation compares: the base model's (the adapter turned off), base +
    adapter's and the merged model's; one model in memory at a time.

    All three in one dtype (:func:`snaketune.devices.inference_placement`): on a GPU the merged
    model's own 16-bit dtype, so that the export check compares it as saved with base + adapter
    computed at the same precision; fp32 on the CPU."""
    from transformers import AutoModelForCausalLM

    from .devices import inference_device
    from .model import device_map, load_base, load_peft_model, load_tokenizer

    place = inference_device(gpus, merged_dir)

    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    ask = dict(system=system, batch_size=evaluation.batch_size)
    identity = dict(ask, max_new_tokens=evaluation.max_new_tokens)
    general = dict(ask, max_new_tokens=evaluation.general_max_new_tokens)
    prompts, general_prompts = evaluation.prompts, [q.question for q in questions]

    def both(model) -> tuple[list, list]:
        """The identity and the general answers; in the same batches when their token limits agree
        (fewer, fuller batches: a decoding step reads every weight once, however many rows it holds)."""
        if identity["max_new_tokens"] != general["max_new_tokens"]:
            return (
                generate_answers(model, tokenizer, template, prompts, **identity),
                generate_answers(model, tokenizer, template, general_prompts, **general),
            )
        answers = generate_answers(model, tokenizer, template, prompts + general_prompts, **general)
        return answers[: len(prompts)], answers[len(prompts) :]

    out = {}
    peft_model = load_peft_model(load_base(base_dir, place.dtype, trust_remote_code, device=place.device), adapter_dir)
    with peft_model.disable_adapter():
        out["base"], out["base_general"] = both(peft_model)
        out["base_nll"] = answer_nll(peft_model, tokenizer, template, out["base_general"], system=system)
    out["adapted"] = generate_answers(peft_model, tokenizer, template, prompts, **identity)
    del peft_model
    merged_model = AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=place.dtype, device_map=device_map(place.device), trust_remote_code=trust_remote_code
    )
    out["merged"], out["merged_general"] = both(merged_model)
    out["merged_nll"] = answer_nll(merged_model, tokenizer, template, out["base_general"], system=system)
    return out


def identity_table(answers: dict[str, list], seen: set[str], keywords) -> list[dict]:
    return [
        {
            "set": "identity",
            "prompt": b.prompt,
            "in_training_data": metrics.normalise(b.prompt) in seen,
            "base": b.answer,
            "finetuned": m.answer,
            "base_plus_adapter": a.answer,
            "finetuned_stopped": m.stopped,
            "finetuned_new_tokens": m.new_tokens,
            "base_claims_identity": metrics.claims_identity(b.answer, keywords),
            "finetuned_claims_identity": metrics.claims_identity(m.answer, keywords),
        }
        for b, a, m in zip(answers["base"], answers["adapted"], answers["merged"])
    ]


def general_table(questions: list, answers: dict[str, list], keywords) -> list[dict]:
    return [
        {
            "set": "general",
            "prompt": q.question,
            "kind": q.kind,
            "lang": q.lang,
            "in_training_data": False,
            "accepted": list(q.answers),
            "base": b.answer,
            "finetuned": m.answer,
            "base_correct": metrics.is_correct(b.answer, q.answers),
            "finetuned_correct": metrics.is_correct(m.answer, q.answers),
            "base_claims_identity": metrics.claims_identity(b.answer, keywords),
            "finetuned_claims_identity": metrics.claims_identity(m.answer, keywords),
            "answer_tokens": bn[1],
            "base_nll": bn[0],
            "finetuned_nll": mn[0],
            "finetuned_stopped": m.stopped,
            "finetuned_new_tokens": m.new_tokens,
        }
        for q, b, m, bn, mn in zip(
            questions, answers["base_general"], answers["merged_general"], answers["base_nll"], answers["merged_nll"]
        )
    ]


def check_problems(identity_rows: list[dict], summary: dict, evaluation: EvaluationConfig) -> list[str]:
    """The export check (merged model == base + adapter), stopping, and the configured thresholds."""
    problems = [
        f"merged model and base + adapter disagree on {r['prompt']!r}: {r['finetuned']!r} vs {r['base_plus_adapter']!r}"
        for r in identity_rows
        if r["finetuned"] != r["base_plus_adapter"]
    ]
    if evaluation.require_stop:
        problems += [
            f"fine-tuned answer to {r['prompt']!r} never stopped: it ran to "
            f"max_new_tokens={evaluation.max_new_tokens} without the template's stop word (check the "
            "template and that the suffix was trained)"
            for r in identity_rows
            if not r["finetuned_stopped"]
        ]
    problems += [t["message"] for t in summary["thresholds"] if not t["passed"]]
    return problems


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _num(value: float | None, sign: bool = False) -> str:
    return "–" if value is None else f"{value:+.3f}" if sign else f"{value:.3f}"


def _bound(summary: dict, metric: str, fmt) -> str:
    found = [t for t in summary["thresholds"] if t["metric"] == metric]
    if not found:
        return ""
    t = found[0]
    return f"{'≥' if t['op'] == '>=' else '≤'} {fmt(t['threshold'])} {'✓' if t['passed'] else '✗ missed'}"


METRIC_COLUMNS = ("metric", "base", "fine-tuned", "threshold")


def metrics_rows(summary: dict) -> list[tuple[str, str, str, str]]:
    """The metrics as text rows (metric, base, fine-tuned, threshold), for evaluation.md and the report."""
    s, ret, nll = summary, summary["retention"], summary["nll"]
    rows = [
        (f"{label} (n={s[key]['n']})", _pct(s[key]["base"]), _pct(s[key]["finetuned"]), _bound(s, key, _pct))
        for key, label in (
            ("identity_trained", "identity, trained prompts"),
            ("identity_heldout", "identity, held-out rephrasings"),
            ("leakage", "leakage: general answers claiming the identity"),
        )
    ]
    rows += [
        (
            f"leakage, {lang} questions (n={r['n']})",
            _pct(r["base"]),
            _pct(r["finetuned"]),
            _bound(s, metrics.language_metric(lang), _pct),
        )
        for lang, r in s.get("leakage_by_language", {}).items()
    ]
    return rows + [
        (
            "retention: the base model's correct general answers still correct",
            "",
            f"{_pct(ret['finetuned'])} ({ret['kept']} of {ret['of']})",
            _bound(s, "retention", _pct),
        ),
        (
            f"accuracy on general questions with an answer key (n={ret['keyed']})",
            _pct(ret["base_accuracy"]),
            _pct(ret["finetuned_accuracy"]),
            "",
        ),
        (
            f"NLL per token of the base model's general answers ({nll['tokens']} tokens)",
            _num(nll["base"]),
            _num(nll["finetuned"]),
            "",
        ),
        (
            "likelihood drift (fine-tuned − base NLL)",
            "",
            _num(nll["drift"], sign=True),
            _bound(s, "nll_drift", lambda v: f"{v:+.3f}"),
        ),
    ]


def markdown(identity_rows: list[dict], general_rows: list[dict], summary: dict, keywords: list[str]) -> str:
    lines = ["# Evaluation: base vs fine-tuned", ""]
    if keywords:
        lines += ["Claims the new identity: the answer contains " + " or ".join(f"`{k}`" for k in keywords), ""]
    lines += [
        "| " + " | ".join(METRIC_COLUMNS) + " |",
        "|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in metrics_rows(summary)),
        "",
        "## Identity prompts",
        "",
        "| prompt | in data | base | fine-tuned |",
        "|---|---|---|---|",
    ]
    for r in identity_rows:
        lines.append(
            f"| {_cell(r['prompt'])} | {'yes' if r['in_training_data'] else 'no'} | "
            f"{_cell(r['base'])} | {_cell(r['finetuned'])} |"
        )
    if general_rows:
        mark = {True: "✓", False: "✗", None: ""}
        lines += [
            "",
            f"## General questions (evaluation-only part of {summary['general_questions']})",
            "",
            "| question | accepted | base | ok | fine-tuned | ok |",
            "|---|---|---|---|---|---|",
        ]
        for r in general_rows:
            lines.append(
                f"| {_cell(r['prompt'])} | {_cell(', '.join(r['accepted']))} | {_cell(r['base'])} | "
                f"{mark[r['base_correct']]} | {_cell(r['finetuned'])} | {mark[r['finetuned_correct']]} |"
            )
    return "\n".join(lines) + "\n"


def training_prompts(data_file: str | os.PathLike) -> set[str]:
    """The user inputs of a conversation dataset, to mark which evaluation prompts were trained on."""
    from .data import read_records

    return {turn["input"] for rec in read_records(data_file) for turn in rec["conversation"]}
