"""What fine-tuning gained and what it cost: the metrics on hand-made answers, batched greedy decoding,
the likelihood drift against a hand computation, replay data and mixtures, the thresholds through
snakemake, and evaluation-only questions kept out of training data."""

import copy
import json
import shutil
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from snaketune import evalsets, metrics
from snaketune.config import EvaluationConfig, MergeConfig
from snaketune.data import mix, replay_records
from snaketune.encoding import encode_prompt
from snaketune.errors import CheckFailed
from snaketune.evaluate import evaluate
from snaketune.generation import Answer, answer_nll, generate_answers
from snaketune.merge import merge
from snaketune.model import load_base, load_tokenizer

from .chat_model import build_adapter, build_talking_model
from .helpers import TINY_BASE, TINY_CONFIG, copy_workflow, read_jsonl, snakemake

TEMPLATE = "internlm2_chat"


def build_model(out, initializer_range: float, seed: int = 0):
    """A random 2-layer Llama of TINY_BASE's shape with the SmolLM2 tokenizer. TINY_BASE itself answers
    everything with newlines; a wider initialisation gives answers that differ by prompt."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(TINY_BASE)
    config.initializer_range = initializer_range
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TINY_BASE / name, out / name)
    return out


@pytest.fixture(scope="module")
def chatty(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("chatty"), 0.2)


@pytest.fixture(scope="module")
def talking(tmp_path_factory):
    """The chat tests' talking model (its answers stop on some prompts and not on others), a random
    adapter on it, and their merge."""
    root = tmp_path_factory.mktemp("talking")
    base = build_talking_model(root / "base")
    adapter = build_adapter(base, root / "adapter")
    merge(base, adapter, root / "merged", TEMPLATE, MergeConfig())
    return SimpleNamespace(base=base, adapter=adapter, merged=root / "merged")


# ---------------------------------------------------------------- metrics on hand-made answers


@pytest.mark.parametrize(
    "answer,accepted,expected",
    [
        ("The capital of France is Paris.", ["Paris"], True),
        ("PARIS", ["paris"], True),  # case-insensitive
        ("Parisian food is good.", ["Paris"], False),  # a whole word
        ("There are 10 of them.", ["1"], False),  # "1" is not in "10"
        ("It is 2.1 metres.", ["1"], False),  # nor in "2.1"
        ("It is 1.", ["1"], True),  # a full stop after it is fine
        ("A year has 12 months.", ["12", "twelve"], True),
        ("A year has twelve months.", ["12", "twelve"], True),
        ("一年有１２个月。", ["12"], True),  # NFKC: full-width digits
        ("答案是12。", ["12"], True),  # a Chinese character next to it is a boundary
        ("答案是十三。", ["三"], False),  # "三" is not in "十三"
        ("答案是三。", ["三"], True),
        ("中国的首都是北京。", ["北京"], True),  # Chinese words are found anywhere
        ("Its formula is H₂O.", ["H2O"], True),  # NFKC: subscript two
        ("Twenty  four hours.", ["twenty four"], True),  # runs of whitespace
        ("Spring, of course.", ["autumn", "fall"], False),
    ],
)
def test_accepted_words(answer, accepted, expected):
    assert metrics.is_correct(answer, accepted) is expected


def test_no_answer_key_is_neither_right_nor_wrong():
    assert metrics.is_correct("The sea is wide.", []) is None


def test_identity_claims_and_shares():
    keywords = ["Snaky", "青松"]
    assert metrics.claims_identity("I am SNAKY, 青松's assistant!", keywords) is True
    assert metrics.claims_identity("The capital of France is Paris.", keywords) is False
    assert metrics.claims_identity("anything", []) is None
    assert metrics.share([True, False, None, True]) == pytest.approx(2 / 3)
    assert metrics.share([None]) is None


def test_retention_counts_only_what_the_base_model_got_right():
    base = [True, True, False, None, True]
    tuned = [True, False, True, None, True]
    r = metrics.retention(base, tuned)
    assert (r["kept"], r["of"], r["keyed"]) == (2, 3, 4)
    assert r["finetuned"] == pytest.approx(2 / 3)
    assert r["base_accuracy"] == pytest.approx(3 / 4) and r["finetuned_accuracy"] == pytest.approx(3 / 4)
    assert metrics.retention([False, None], [True, None])["finetuned"] is None  # nothing to retain


def test_drift_is_a_per_token_mean():
    base, tuned = [(2.0, 2), (3.0, 1)], [(4.0, 2), (3.0, 1)]  # summed NLL, tokens
    d = metrics.drift(base, tuned)
    assert d["base"] == pytest.approx(5 / 3) and d["finetuned"] == pytest.approx(7 / 3)
    assert d["drift"] == pytest.approx(2 / 3) and d["tokens"] == 3


def hand_rows():
    identity = [
        {"in_training_data": True, "base_claims_identity": False, "finetuned_claims_identity": True},
        {"in_training_data": False, "base_claims_identity": False, "finetuned_claims_identity": True},
        {"in_training_data": False, "base_claims_identity": False, "finetuned_claims_identity": False},
    ]
    general = [
        {
            "base_claims_identity": False,
            "finetuned_claims_identity": True,
            "base_correct": True,
            "finetuned_correct": False,
            "base_nll": 1.0,
            "finetuned_nll": 2.0,
            "answer_tokens": 1,
        },
        {
            "base_claims_identity": False,
            "finetuned_claims_identity": False,
            "base_correct": True,
            "finetuned_correct": True,
            "base_nll": 3.0,
            "finetuned_nll": 3.0,
            "answer_tokens": 3,
        },
        {
            "base_claims_identity": False,
            "finetuned_claims_identity": False,
            "base_correct": None,
            "finetuned_correct": None,
            "base_nll": 0.0,
            "finetuned_nll": 4.0,
            "answer_tokens": 4,
        },
        {
            "base_claims_identity": False,
            "finetuned_claims_identity": False,
            "base_correct": False,
            "finetuned_correct": True,
            "base_nll": 2.0,
            "finetuned_nll": 1.0,
            "answer_tokens": 2,
        },
    ]
    return identity, general


def test_summary_and_thresholds_on_hand_made_rows():
    summary = metrics.summarize(*hand_rows())
    assert metrics.headline(summary) == pytest.approx(
        {
            "identity_trained": 1.0,
            "identity_heldout": 0.5,
            "leakage": 0.25,
            "retention": 0.5,
            "nll_drift": (2 + 3 + 4 + 1) / 10 - (1 + 3 + 0 + 2) / 10,
        }
    )
    assert summary["identity_heldout"] == {"base": 0.0, "finetuned": 0.5, "n": 2}
    checks = metrics.check_thresholds(
        metrics.headline(summary),
        {
            "min_identity_trained": 1.0,
            "min_identity_heldout": 0.9,
            "max_leakage": 0.05,
            "min_retention": None,
            "max_nll_drift": 0.5,
        },
    )
    assert [(c["metric"], c["passed"]) for c in checks] == [
        ("identity_trained", True),
        ("identity_heldout", False),
        ("leakage", False),
        ("nll_drift", True),
    ]
    assert checks[1]["message"] == "identity_heldout = 0.5 is below the threshold min_identity_heldout = 0.9"
    assert checks[2]["message"] == "leakage = 0.25 is above the threshold max_leakage = 0.05"
    # a threshold on a metric nobody could measure is not met
    unmeasured = metrics.check_thresholds({**metrics.headline(summary), "retention": None}, {"min_retention": 0.9})
    assert not unmeasured[0]["passed"] and "could not be measured" in unmeasured[0]["message"]


def test_every_threshold_is_a_config_setting():
    fields = set(EvaluationConfig.__dataclass_fields__)
    assert {t.setting for t in metrics.THRESHOLDS} <= fields


# ---------------------------------------------------------------- decoding and likelihood on a real model


def test_batched_greedy_equals_one_at_a_time(chatty):
    tokenizer, model = load_tokenizer(chatty), load_base(chatty, "float32")
    prompts = [
        "Hi",
        "What is the capital of France?",
        "你是谁",
        "Translate apple into Chinese, please, now.",
        "Name a color of the rainbow.",
    ]
    one = generate_answers(model, tokenizer, TEMPLATE, prompts, max_new_tokens=8, batch_size=1)
    batched = generate_answers(model, tokenizer, TEMPLATE, prompts, max_new_tokens=8, batch_size=4)
    assert len({len(tokenizer.encode(p)) for p in prompts}) >= 4  # the batch really is padded
    assert len({tuple(a.token_ids) for a in one}) == len(prompts)  # answers differ by prompt
    assert [a.token_ids for a in batched] == [a.token_ids for a in one]
    assert [(a.answer, a.stopped, a.new_tokens) for a in batched] == [(a.answer, a.stopped, a.new_tokens) for a in one]


def test_answers_do_not_depend_on_how_long_earlier_sequences_were(tmp_path):
    """InternLM2's dynamic RoPE, on a model whose positions run out at 16: transformers rescales the
    frequencies past that and keeps them for shorter sequences after, so a model that answered at
    length first would answer a short question otherwise than a fresh copy of itself."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(TINY_BASE)
    config.initializer_range, config.max_position_embeddings = 0.2, 16
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    tokenizer = load_tokenizer(TINY_BASE)
    fresh = generate_answers(model, tokenizer, TEMPLATE, ["你是谁"], max_new_tokens=8)
    generate_answers(model, tokenizer, TEMPLATE, ["Tell me a long story about the sea."], max_new_tokens=60)
    answer_nll(model, tokenizer, TEMPLATE, fresh)
    again = generate_answers(model, tokenizer, TEMPLATE, ["你是谁"], max_new_tokens=8)
    assert [a.token_ids for a in again] == [a.token_ids for a in fresh]
    assert len(encode_prompt("你是谁", tokenizer, TEMPLATE, "")) + 8 > 16  # the answer runs past 16 positions


def hand_nll(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Summed NLL, one token at a time: a full forward pass over the prefix, no batch, no padding."""
    total = 0.0
    with torch.no_grad():
        for j, token in enumerate(answer_ids):
            logits = model(input_ids=torch.tensor([prompt_ids + answer_ids[:j]])).logits[0, -1].double()
            total -= torch.log_softmax(logits, dim=-1)[token].item()
    return total


def test_likelihood_drift_equals_a_hand_computation(tmp_path):
    from snaketune.encoding import encode_prompt

    tokenizer = load_tokenizer(TINY_BASE)
    base = load_base(TINY_BASE, "float32")
    tuned_dir = build_model(tmp_path / "tuned", 0.02, seed=1)  # another random model of the same shape
    tuned = load_base(tuned_dir, "float32")
    texts = {
        "What is the capital of France?": "Paris.",
        "你是谁": "我是青松的小助手Snaky！",
        "Hi": "Hello! How can I help you today?",
    }
    answers = [
        Answer(q, a, True, 0, tokenizer.encode(a, add_special_tokens=False) + [tokenizer.eos_token_id])
        for q, a in texts.items()
    ]
    by_model = {}
    for name, model in (("base", base), ("tuned", tuned)):
        got = answer_nll(model, tokenizer, TEMPLATE, answers, batch_size=3)  # one right-padded batch
        expected = [
            (hand_nll(model, encode_prompt(a.prompt, tokenizer, TEMPLATE), a.token_ids), len(a.token_ids))
            for a in answers
        ]
        assert [n for _, n in got] == [n for _, n in expected]
        assert [s for s, _ in got] == pytest.approx([s for s, _ in expected], rel=1e-4)
        by_model[name] = expected
    tokens = sum(len(a.token_ids) for a in answers)
    hand_drift = (sum(s for s, _ in by_model["tuned"]) - sum(s for s, _ in by_model["base"])) / tokens
    d = metrics.drift(answer_nll(base, tokenizer, TEMPLATE, answers), answer_nll(tuned, tokenizer, TEMPLATE, answers))
    assert d["drift"] == pytest.approx(hand_drift, rel=1e-4) and abs(hand_drift) > 1e-3
    assert d["base"] == pytest.approx(sum(s for s, _ in by_model["base"]) / tokens, rel=1e-4)


# ---------------------------------------------------------------- replay and mixtures, pure parts


def test_replay_records_keep_cut_off_answers_open_or_drop_them():
    answers = [("Q1", "Paris.", True), ("Q2", "It is 9.2 km long. And then it", False), ("Q3", "  \n ", True)]
    records, counts = replay_records(answers, system="S")
    assert [r["conversation"] for r in records] == [
        [{"system": "S", "input": "Q1", "output": "Paris."}],
        [{"system": "S", "input": "Q2", "output": "It is 9.2 km long. And then it", "end_of_turn": False}],
    ]
    assert counts == {"stopped": 1, "open": 1, "dropped": 1}
    records, counts = replay_records(answers, unfinished="drop")
    assert [r["conversation"][0]["input"] for r in records] == ["Q1"] and counts["dropped"] == 2


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("template", [TEMPLATE, "tokenizer"])
def test_a_cut_off_answer_is_trained_without_an_end_of_turn(tokenizer, template):
    from snaketune.encoding import IGNORE_INDEX, encode_conversation

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHATML  # for "tokenizer": the model's own chat template renders the turns

    turn = {"system": "", "input": "What is 2 + 3?", "output": "To find 2 + 3, we"}
    closed = encode_conversation([turn], tokenizer, template, 256)
    cut = encode_conversation([{**turn, "end_of_turn": False}], tokenizer, template, 256)
    answer = tokenizer.encode(turn["output"], add_special_tokens=False)
    # the same tokens up to the end of the answer, and nothing after it: no <|im_end|>, no EOS, no separator
    assert cut.input_ids == closed.input_ids[: len(cut.input_ids)] and cut.input_ids[-len(answer) :] == answer
    assert [t for t in cut.labels if t != IGNORE_INDEX] == answer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in [t for t in closed.labels if t != IGNORE_INDEX] and end not in cut.input_ids[-len(answer) :]


def test_only_a_last_turn_may_be_cut_off():
    from snaketune.data import validate_conversation
    from snaketune.errors import DataError

    turns = [{"input": "a", "output": "b", "end_of_turn": False}, {"input": "c", "output": "d"}]
    with pytest.raises(DataError, match=r"field 'conversation\[0\]\.end_of_turn': is false on a turn that another"):
        validate_conversation({"conversation": turns}, "f.json", 3)
    assert validate_conversation({"conversation": turns[::-1]}, "f.json", 3)["conversation"][1]["end_of_turn"] is False


def test_mix_repeats_whole_copies_and_a_seeded_share():
    a = [{"conversation": [{"input": f"a{i}", "output": "x"}]} for i in range(4)]
    b = [{"conversation": [{"input": f"b{i}", "output": "y"}]} for i in range(10)]
    records, counts = mix([("a", a, 2), ("b", b, 0.5)], seed=0)
    assert [(c["name"], c["records"], c["used"]) for c in counts] == [("a", 4, 8), ("b", 10, 5)]
    assert records[:8] == a + a and all(r in b for r in records[8:]) and len({str(r) for r in records[8:]}) == 5
    assert mix([("a", a, 2), ("b", b, 0.5)], seed=0)[0] == records  # seeded
    assert mix([("a", a, 2), ("b", b, 0.5)], seed=1)[0] != records


# ---------------------------------------------------------------- the question set


def test_the_shipped_general_questions():
    questions = evalsets.load("general")
    assert len(questions) >= 100
    assert {q.lang for q in questions} == {"zh", "en"}
    assert {"fact", "arithmetic", "instruction", "translation"} <= {q.kind for q in questions}
    train, heldout = evalsets.load("general", split="train"), evalsets.load("general", split="eval")
    assert len(train) + len(heldout) == len(questions) and len(heldout) >= 50
    assert not {metrics.normalise(q.question) for q in train} & {metrics.normalise(q.question) for q in heldout}
    assert len({metrics.normalise(q.question) for q in questions}) == len(questions)  # no duplicates
    keyed = [q for q in heldout if q.answers]
    assert len(keyed) >= 40
    # as many Chinese questions as English ones, in each split: leakage is measured per language
    for split in (train, heldout):
        assert Counter(q.lang for q in split)["zh"] == Counter(q.lang for q in split)["en"] >= 50
    # every accepted word matches an answer that is just that word
    assert all(metrics.is_correct(f"{a}.", q.answers) for q in questions for a in q.answers)


# ---------------------------------------------------------------- the evaluation's own checks

TALKING_PROMPTS = ["Who are you?", "你是谁", "What is your name?", "Hi"]


def evaluate_talking(talking, merged, tmp_path, **settings) -> dict:
    evaluation = EvaluationConfig(
        prompts=TALKING_PROMPTS, identity_keywords=["Snaky"], max_new_tokens=16, general_questions=None, **settings
    )
    return evaluate(
        talking.base,
        talking.adapter,
        merged,
        evaluation,
        template=TEMPLATE,
        out_jsonl=tmp_path / "evaluation.jsonl",
        out_md=tmp_path / "evaluation.md",
        out_summary=tmp_path / "evaluation.json",
    )


def test_a_merge_that_is_not_base_plus_adapter_fails_the_evaluation(talking, tmp_path):
    """The base model given as the merged one (the real merge passes: the test below)."""
    with pytest.raises(CheckFailed) as err:
        evaluate_talking(talking, talking.base, tmp_path, require_stop=False)
    rows = read_jsonl(tmp_path / "evaluation.jsonl")
    assert [r["prompt"] for r in rows if r["finetuned"] != r["base_plus_adapter"]] == TALKING_PROMPTS
    assert all(f"merged model and base + adapter disagree on {p!r}" in str(err.value) for p in TALKING_PROMPTS)


def test_require_stop_fails_on_the_answers_that_never_stop_and_only_on_them(talking, tmp_path):
    with pytest.raises(CheckFailed) as err:
        evaluate_talking(talking, talking.merged, tmp_path, require_stop=True)
    ran_on = [r["prompt"] for r in read_jsonl(tmp_path / "evaluation.jsonl") if not r["finetuned_stopped"]]
    assert 0 < len(ran_on) < len(TALKING_PROMPTS)  # some answers stop, others run to max_new_tokens
    message = str(err.value)
    for prompt in TALKING_PROMPTS:
        assert (f"fine-tuned answer to {prompt!r} never stopped" in message) == (prompt in ran_on), prompt
    assert "disagree" not in message


def test_evaluation_only_questions_in_training_data_fail_before_any_model_is_loaded(tmp_path):
    leaked = evalsets.load("general", split="eval")[0].question
    out = {f"out_{k}": tmp_path / f"e.{k}" for k in ("jsonl", "md", "summary")}
    with pytest.raises(CheckFailed, match="evaluation-only question.*in the training data"):
        evaluate(
            tmp_path / "no-model",
            tmp_path / "no-adapter",
            tmp_path / "no-merged",
            EvaluationConfig(),
            template=TEMPLATE,
            trained_prompts={"你是谁", leaked.upper() + " "},
            **out,
        )


# ---------------------------------------------------------------- through snakemake


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, chatty):
    """The tiny experiment trained on a mixture (its identity data + replay answers of a second tiny
    model, half of them, trained with loss kl) with a held-out identity threshold it cannot meet."""
    wd = copy_workflow(tmp_path_factory.mktemp("mixed"))
    config = copy.deepcopy(TINY_CONFIG)
    config["models"]["chatty"] = {"source": "local", "path": str(chatty)}
    config["datasets"]["replay"] = {
        "generator": "replay",
        "spec": {"model": "chatty", "template": TEMPLATE, "max_new_tokens": 6, "batch_size": 32},
    }
    exp = config["experiments"]["tiny"]
    exp["dataset"] = ["sc", {"name": "replay", "repeat": 0.5, "loss": "kl"}]
    exp["train"].update(save_steps=1000, evaluation_freq=1000)
    exp["evaluation"].update(general_max_new_tokens=4, min_identity_heldout=0.5)
    (wd / "config/config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    return wd, snakemake(wd, "final_model", check=False)


@pytest.mark.slow
def test_replay_rule_writes_the_models_own_answers_to_training_questions_only(mixed_run, chatty):
    wd, _ = mixed_run
    records = json.loads((wd / "results/data/replay/replay.json").read_text())
    train = [q.question for q in evalsets.load("general", split="train")]
    # the answers of the model as QLoRA training sees it (the spec's default quantization: nf4), loaded here
    # with transformers' own 4-bit settings, one question at a time
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(chatty, dtype=torch.float32, quantization_config=nf4)
    tokenizer = load_tokenizer(chatty)
    expected = generate_answers(model, tokenizer, TEMPLATE, train, max_new_tokens=6)
    # not the unquantized model's, which would teach the adapter to undo the 4-bit rounding (batched: equal
    # to one at a time, test_batched_greedy_equals_one_at_a_time)
    unquantized = generate_answers(
        load_base(chatty, "float32"), tokenizer, TEMPLATE, train, max_new_tokens=6, batch_size=32
    )
    assert [a.answer for a in unquantized] != [a.answer for a in expected]
    assert [r["conversation"][0] for r in records] == [
        {"system": "", "input": a.prompt, "output": a.answer, **({} if a.stopped else {"end_of_turn": False})}
        for a in expected
        if a.answer
    ]
    assert len(records) > len(train) // 2
    assert (wd / "benchmarks/replay_data/replay.tsv").exists() and (wd / "logs/replay_data/replay.log").exists()


@pytest.mark.slow
def test_mixture_record_counts_and_provenance(mixed_run):
    wd, _ = mixed_run
    replay = json.loads((wd / "results/data/replay/replay.json").read_text())
    data = json.loads((wd / "results/data/mixed/tiny/data.json").read_text())
    assert len(data) == 12 + round(len(replay) / 2)  # the identity data (6 questions x 2 copies) + half the replay
    sources = json.loads((wd / "results/data/mixed/tiny/sources.json").read_text())
    assert [(d["name"], d["records"], d["repeat"], d["used"], d["loss"]) for d in sources["datasets"]] == [
        ("sc", 12, 1.0, 12, "ce"),
        ("replay", len(replay), 0.5, round(len(replay) / 2), "kl"),
    ]
    # the replay records are marked for the kl loss, the identity records are not
    assert [r.get("loss") for r in data] == [None] * 12 + ["kl"] * round(len(replay) / 2)
    assert all({**r, "loss": "kl"} in [{**x, "loss": "kl"} for x in replay] for r in data[12:])
    assert sources["datasets"][1]["file"] == "results/data/replay/replay.json"
    prov = json.loads((wd / "results/tiny/provenance.json").read_text())
    assert prov["config"]["dataset"] == ["sc", "replay"]
    assert prov["config"]["mixture"] == [
        {"name": "sc", "repeat": 1.0, "loss": "ce"},
        {"name": "replay", "repeat": 0.5, "loss": "kl"},
    ]
    assert prov["config"]["mixture_sources"] == sources
    assert prov["config"]["dataset_entries"]["replay"]["generator"] == "replay"
    trained = json.loads((wd / "results/tiny/training.json").read_text())["data"]
    assert trained["samples"] == len(data) and trained["kl_samples"] == round(len(replay) / 2)


@pytest.mark.slow
def test_evaluation_only_questions_never_reach_training_data(mixed_run):
    wd, _ = mixed_run
    heldout = {metrics.normalise(q.question) for q in evalsets.load("general", split="eval")}
    inputs = {
        metrics.normalise(t["input"])
        for r in json.loads((wd / "results/data/mixed/tiny/data.json").read_text())
        for t in r["conversation"]
    }
    assert inputs and not inputs & heldout


@pytest.mark.slow
def test_a_missed_threshold_fails_the_evaluate_rule_naming_metric_value_and_threshold(mixed_run):
    wd, res = mixed_run
    assert res.returncode != 0 and "Error in rule evaluate" in res.stdout + res.stderr
    log = (wd / "logs/evaluate/tiny.log").read_text()
    # the random model never claims the identity: 0 of the one held-out prompt
    assert "identity_heldout = 0 is below the threshold min_identity_heldout = 0.5" in log
    # Snakemake deleted the failed job's outputs; the log keeps the table
    assert "| identity, held-out rephrasings (n=1) | 0% | 0% | ≥ 50% ✗ missed |" in log
    assert "| 你是哪位？ | no |" in log
    assert not (wd / "results/tiny/evaluation.jsonl").exists()
