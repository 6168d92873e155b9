"""Leakage counted per language: an aggregate over languages must not hide the one a model leaks in."""

import pytest

from snaketune import metrics
from snaketune.evaluate import metrics_rows


def general_row(lang, leaks):
    return {
        "lang": lang,
        "base_claims_identity": False,
        "finetuned_claims_identity": leaks,
        "base_correct": True,
        "finetuned_correct": True,
        "base_nll": 1.0,
        "finetuned_nll": 1.0,
        "answer_tokens": 1,
    }


def rows():
    identity = [{"in_training_data": True, "base_claims_identity": False, "finetuned_claims_identity": True}]
    # zh: 1 of 3 answers claims the identity; en: 0 of 2. Together 1 of 5.
    general = [general_row("zh", True), general_row("zh", False), general_row("zh", False)]
    general += [general_row("en", False), general_row("en", False)]
    return identity, general


def test_leakage_is_counted_per_language_and_bounded_in_each():
    summary = metrics.summarize(*rows())
    assert summary["leakage"]["finetuned"] == pytest.approx(1 / 5)
    assert summary["leakage_by_language"] == {
        "en": {"base": 0.0, "finetuned": 0.0, "n": 2},
        "zh": {"base": 0.0, "finetuned": pytest.approx(1 / 3), "n": 3},
    }
    values = metrics.headline(summary)
    checks = metrics.check_thresholds(values, {"max_leakage": 0.25, "max_leakage_per_language": 0.25})
    # the aggregate passes; Chinese, counted on its own, does not
    assert [(c["metric"], c["passed"]) for c in checks] == [
        ("leakage", True),
        ("leakage[en]", True),
        ("leakage[zh]", False),
    ]
    assert checks[2]["message"] == "leakage[zh] = 0.3333 is above the threshold max_leakage_per_language = 0.25"
    summary["thresholds"] = checks
    table = {row[0]: row[1:] for row in metrics_rows(summary)}
    assert table["leakage, zh questions (n=3)"] == ("0%", "33%", "≤ 25% ✗ missed")
    assert table["leakage, en questions (n=2)"] == ("0%", "0%", "≤ 25% ✓")


def test_a_per_language_bound_with_no_language_to_measure_is_not_met():
    identity, general = rows()
    for r in general:
        del r["lang"]
    summary = metrics.summarize(identity, general)
    assert summary["leakage_by_language"] == {}
    (check,) = metrics.check_thresholds(metrics.headline(summary), {"max_leakage_per_language": 0.5})
    assert not check["passed"] and "could not be measured" in check["message"]
