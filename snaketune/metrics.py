"""What fine-tuning gained and what it cost, from answers: identity, leakage, retention, drift.

- identity: the share of answers to identity questions that claim the new
  identity (contain one of its keywords), on trained prompts and on held-out
  rephrasings that were never in the training data;
- leakage: the share of answers to general questions that claim it anyway;
- retention: of the general questions the base model answers correctly, the
  share the fine-tuned model still answers correctly;
- drift: the mean per-token negative log-likelihood of the base model's own
  greedy answers under the fine-tuned model minus under the base model. It
  needs no answer key and moves before greedy answers change.

Pure functions of answer texts and summed log-likelihoods, so each is tested
on hand-made answers.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

# An accepted answer that starts or ends with an ASCII letter or digit must not continue a word or
# number there ("1" is not found in "10" or "2.1"); one of Chinese numerals not inside a longer one
# ("三" is not found in "十三"). Other text (Chinese words) is found anywhere.
_ASCII = "A-Za-z0-9"
_CJK_NUMERALS = "零〇一二三四五六七八九十百千万亿两"


def normalise(text: str) -> str:
    """NFKC (full-width digits and letters become ASCII), case-folded, runs of whitespace as one space."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


@cache
def _pattern(accepted: str) -> re.Pattern:
    word = normalise(accepted)
    if not word:
        raise ValueError("an accepted answer is empty")
    before = after = ""
    if re.match(f"[{_ASCII}]", word[0]):
        before = f"(?<![{_ASCII}])(?<![0-9][.,])"
    elif word[0] in _CJK_NUMERALS:
        before = f"(?<![{_CJK_NUMERALS}])"
    if re.match(f"[{_ASCII}]", word[-1]):
        after = f"(?![{_ASCII}])(?![.,][0-9])"
    elif word[-1] in _CJK_NUMERALS:
        after = f"(?![{_CJK_NUMERALS}])"
    return re.compile(before + re.escape(word) + after)


def is_correct(answer: str, accepted: Iterable[str]) -> bool | None:
    """Whether the answer contains one of the accepted words; None when there is no answer key."""
    accepted = list(accepted)
    if not accepted:
        return None
    text = normalise(answer)
    return any(_pattern(a).search(text) for a in accepted)


def claims_identity(answer: str, keywords: Iterable[str]) -> bool | None:
    """Whether the answer names the new identity (contains a keyword); None without keywords."""
    keywords = [normalise(k) for k in keywords]
    if not keywords:
        return None
    text = normalise(answer)
    return any(k in text for k in keywords)


def share(flags: Iterable[bool | None]) -> float | None:
    """The share of True among the flags that are not None; None when there are none."""
    vals = [f for f in flags if f is not None]
    return sum(vals) / len(vals) if vals else None


def retention(base_correct: list[bool | None], finetuned_correct: list[bool | None]) -> dict[str, Any]:
    """Of the questions the base model answers correctly, the share the fine-tuned one still does."""
    keyed = [(b, f) for b, f in zip(base_correct, finetuned_correct, strict=True) if b is not None]
    of = sum(b for b, _ in keyed)
    kept = sum(b and f for b, f in keyed)
    return {
        "finetuned": kept / of if of else None,
        "kept": kept,
        "of": of,
        "keyed": len(keyed),
        "base_accuracy": share(b for b, _ in keyed),
        "finetuned_accuracy": share(f for _, f in keyed),
    }


def mean_nll(nlls: list[tuple[float, int]]) -> float | None:
    """Per-token mean over all answers: summed NLLs over summed token counts."""
    tokens = sum(n for _, n in nlls)
    return sum(s for s, _ in nlls) / tokens if tokens else None


def drift(base: list[tuple[float, int]], finetuned: list[tuple[float, int]]) -> dict[str, Any]:
    """Mean per-token NLL of the same answers under the base and the fine-tuned model, and the
    difference (positive: the fine-tuned model finds the base model's answers less likely)."""
    b, f = mean_nll(base), mean_nll(finetuned)
    return {
        "base": b,
        "finetuned": f,
        "drift": None if b is None or f is None else f - b,
        "tokens": sum(n for _, n in base),
    }


def summarize(identity_rows: list[dict], general_rows: list[dict]) -> dict[str, Any]:
    """The metrics of one evaluation from its rows (as written to evaluation.jsonl)."""
    trained = [r for r in identity_rows if r["in_training_data"]]
    heldout = [r for r in identity_rows if not r["in_training_data"]]

    def rates(rows: list[dict], key: str) -> dict[str, Any]:
        return {
            "base": share(r[f"base_{key}"] for r in rows),
            "finetuned": share(r[f"finetuned_{key}"] for r in rows),
            "n": len(rows),
        }

    return {
        "identity_trained": rates(trained, "claims_identity"),
        "identity_heldout": rates(heldout, "claims_identity"),
        "leakage": rates(general_rows, "claims_identity"),
        # An aggregate over languages hides a language the model leaks in: each is counted on its own.
        "leakage_by_language": {
            lang: rates(rows, "claims_identity") for lang, rows in sorted(by_language(general_rows).items())
        },
        "retention": retention(
            [r["base_correct"] for r in general_rows], [r["finetuned_correct"] for r in general_rows]
        ),
        "nll": drift(
            [(r["base_nll"], r["answer_tokens"]) for r in general_rows],
            [(r["finetuned_nll"], r["answer_tokens"]) for r in general_rows],
        ),
    }


def by_language(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by their question's language; rows of a question set that names none are left out."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("lang"):
            groups.setdefault(r["lang"], []).append(r)
    return groups


def language_metric(lang: str) -> str:
    return f"leakage[{lang}]"


def headline(summary: dict[str, Any]) -> dict[str, float | None]:
    """The fine-tuned model's figure of each metric, by the name thresholds use."""
    return {
        "identity_trained": summary["identity_trained"]["finetuned"],
        "identity_heldout": summary["identity_heldout"]["finetuned"],
        "leakage": summary["leakage"]["finetuned"],
        **{language_metric(lang): r["finetuned"] for lang, r in summary.get("leakage_by_language", {}).items()},
        "retention": summary["retention"]["finetuned"],
        "nll_drift": summary["nll"]["drift"],
    }


@dataclass(frozen=True)
class Threshold:
    setting: str  # the EvaluationConfig field
    metric: str  # the headline metric it bounds
    at_least: bool  # a minimum (True) or a maximum


THRESHOLDS = (
    Threshold("min_identity_trained", "identity_trained", True),
    Threshold("min_identity_heldout", "identity_heldout", True),
    Threshold("max_leakage", "leakage", False),
    Threshold("min_retention", "retention", True),
    Threshold("max_nll_drift", "nll_drift", False),
)
# Bounds the leakage of every language of the general questions, each counted on its own.
PER_LANGUAGE = Threshold("max_leakage_per_language", "leakage", False)
SETTINGS = tuple(t.setting for t in THRESHOLDS) + (PER_LANGUAGE.setting,)


def check_thresholds(values: dict[str, float | None], bounds: dict[str, float | None]) -> list[dict[str, Any]]:
    """Each configured threshold (``bounds``: setting -> bound or None) against the metric's value.

    A metric that could not be measured (no held-out prompt, no keyed general question the base
    model got right, no general question in any language) fails its threshold: a guarantee nobody
    measured is not met.
    """
    checks = [(t, t.metric) for t in THRESHOLDS if bounds.get(t.setting) is not None]
    if bounds.get(PER_LANGUAGE.setting) is not None:
        languages = [m for m in values if m.startswith("leakage[")]
        checks += [(PER_LANGUAGE, m) for m in languages or [language_metric("any")]]
    return [_check(t, metric, values.get(metric), bounds[t.setting]) for t, metric in checks]


def _check(t: Threshold, metric: str, value: float | None, bound: float) -> dict[str, Any]:
    passed = value is not None and (value >= bound if t.at_least else value <= bound)
    if passed:
        message = ""
    elif value is None:
        message = f"{metric} could not be measured (nothing to measure it on), threshold {t.setting} = {bound:g}"
    else:
        message = (
            f"{metric} = {value:.4g} is {'below' if t.at_least else 'above'} the threshold {t.setting} = {bound:g}"
        )
    return {
        "metric": metric,
        "value": value,
        "setting": t.setting,
        "threshold": bound,
        "op": ">=" if t.at_least else "<=",
        "passed": passed,
        "message": message,
    }
