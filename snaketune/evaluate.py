"""Base vs fine-tuned answers, side by side, with the cheap checks that catch broken exports."""

from __future__ import annotations

import logging
import os
from typing import Any

from .config import EvaluationConfig
from .generation import generate_answers

log = logging.getLogger(__name__)


class CheckFailed(RuntimeError):
    pass


def evaluate(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, merged_dir: str | os.PathLike,
             evaluation: EvaluationConfig, *, template: str, system: str = "",
             trained_prompts: set[str] = frozenset(), trust_remote_code: bool = False,
             out_jsonl: str | os.PathLike, out_md: str | os.PathLike) -> dict:
    """Greedy answers of base, base + adapter and merged model to ``evaluation.prompts``."""
    from transformers import AutoModelForCausalLM

    from .data import write_records
    from .files import write_text
    from .model import load_base, load_peft_model, load_tokenizer

    prompts, identity_keywords = evaluation.prompts, evaluation.identity_keywords
    max_new_tokens = evaluation.max_new_tokens
    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    gen = dict(system=system, max_new_tokens=max_new_tokens)
    peft_model = load_peft_model(load_base(base_dir, "float32", trust_remote_code), adapter_dir)
    with peft_model.disable_adapter():
        base = generate_answers(peft_model, tokenizer, template, prompts, **gen)
    adapted = generate_answers(peft_model, tokenizer, template, prompts, **gen)
    del peft_model
    merged_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="float32", device_map="cpu",
                                                        trust_remote_code=trust_remote_code)
    merged = generate_answers(merged_model, tokenizer, template, prompts, **gen)

    def claims(text: str) -> bool | None:
        return None if not identity_keywords else any(k.lower() in text.lower() for k in identity_keywords)

    rows = []
    for b, a, m in zip(base, adapted, merged):
        rows.append({"prompt": b.prompt, "in_training_data": b.prompt in trained_prompts,
                     "base": b.answer, "finetuned": m.answer, "base_plus_adapter": a.answer,
                     "finetuned_stopped": m.stopped, "finetuned_new_tokens": m.new_tokens,
                     "base_claims_identity": claims(b.answer), "finetuned_claims_identity": claims(m.answer)})
    summary = _summary(rows, identity_keywords)
    table = _markdown(rows, summary, identity_keywords)
    write_records(rows, out_jsonl)
    write_text(out_md, table)
    log.info("evaluation summary: %s", summary)

    problems = [f"merged model and base + adapter disagree on {r['prompt']!r}: {r['finetuned']!r} vs "
                f"{r['base_plus_adapter']!r}" for r in rows if r["finetuned"] != r["base_plus_adapter"]]
    if evaluation.require_stop:
        problems += [f"fine-tuned answer to {r['prompt']!r} never stopped: it ran to max_new_tokens={max_new_tokens} "
                     "without the template's stop word (check the template and that the suffix was trained)"
                     for r in rows if not r["finetuned_stopped"]]
    if problems:
        # Snakemake deletes the outputs of a failed job: keep the answers in the log.
        log.error("the answers:\n%s", table)
        raise CheckFailed("evaluation checks failed:\n- " + "\n- ".join(problems))
    return summary


def _rate(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r[key] is not None]
    return sum(vals) / len(vals) if vals else None


def _summary(rows: list[dict], keywords: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {"prompts": len(rows),
                               "finetuned_stopped": sum(r["finetuned_stopped"] for r in rows)}
    if keywords:
        for name, subset in [("all", rows), ("trained", [r for r in rows if r["in_training_data"]]),
                             ("unseen", [r for r in rows if not r["in_training_data"]])]:
            summary[f"identity_rate_base_{name}"] = _rate(subset, "base_claims_identity")
            summary[f"identity_rate_finetuned_{name}"] = _rate(subset, "finetuned_claims_identity")
    return summary


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def _markdown(rows: list[dict], summary: dict, keywords: list[str]) -> str:
    lines = ["# Evaluation: base vs fine-tuned", ""]
    if keywords:
        lines += ["Claims the new identity: the answer contains " + " or ".join(f"`{k}`" for k in keywords),
                  "", "| prompts | base claims it | fine-tuned claims it |",
                  "|---|---|---|"]
        for name in ("trained", "unseen", "all"):
            b, f = summary[f"identity_rate_base_{name}"], summary[f"identity_rate_finetuned_{name}"]
            if b is not None:
                lines.append(f"| {name} | {b:.0%} | {f:.0%} |")
        lines.append("")
    lines += ["| prompt | in data | base | fine-tuned |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_cell(r['prompt'])} | {'yes' if r['in_training_data'] else 'no'} | "
                     f"{_cell(r['base'])} | {_cell(r['finetuned'])} |")
    return "\n".join(lines) + "\n"


def training_prompts(data_file: str | os.PathLike) -> set[str]:
    """The user inputs of a conversation dataset, to mark which evaluation prompts were trained on."""
    from .data import read_records

    return {turn["input"] for rec in read_records(data_file) for turn in rec["conversation"]}
