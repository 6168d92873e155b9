"""``snaketune chat``: multi-turn prompts in the training format, greedy answers, streaming, the terminal.

Expected prompts are typed out from XTuner's template strings; expected
answers come from ``generate_answers`` (single turn) or from a plain argmax
loop over the model's logits on typed-out ids (later turns), never from the
chat code itself.
"""

import io
import itertools
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from snaketune.chat import HELP, Chat, GenerationSettings, load_model, read_prompt, repl
from snaketune.cli import main
from snaketune.config import MergeConfig
from snaketune.generation import generate_answers
from snaketune.merge import merge
from snaketune.model import load_base, load_peft_model

from .chat_model import argmax_answer, build_adapter, build_talking_model, chatml
from .helpers import TINY_BASE, XTUNER, run_cli

BOS, EOS = 0, 2
SYSTEM = "You are Snaky."
MAX = 16
LONG = 200  # more tokens than the talking model's longer answers take


class Talking:
    def __init__(self, root):
        self.base = build_talking_model(root / "base")
        self.adapter = build_adapter(self.base, root / "adapter")
        self.merged = root / "merged"
        merge(self.base, self.adapter, self.merged, "internlm2_chat", MergeConfig())
        self.model, self.tok = load_model(self.base)

    def enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def talking(tmp_path_factory):
    return Talking(tmp_path_factory.mktemp("talking"))


def greedy(model, tok, prompts, system=SYSTEM, max_new_tokens=MAX):
    return [
        a.answer
        for a in generate_answers(model, tok, "internlm2_chat", prompts, system=system, max_new_tokens=max_new_tokens)
    ]


# ---------------------------------------------------------------- the Chat class


def test_prompts_are_xtuners_multi_turn_format(talking):
    enc = talking.enc
    chat = Chat(talking.model, talking.tok, "default", system="S")
    chat.history = [{"input": "Q1", "output": "A1"}, {"input": "Q2", "output": "A2"}]
    # default: no suffix, so EOS ends each answer (supervised in training) and BOS starts the next turn
    assert chat.prompt_ids("Q3") == (
        [BOS]
        + enc("<|System|>:S\n<|User|>:Q1\n<|Bot|>:")
        + enc("A1")
        + [EOS]
        + enc("\n")
        + [BOS]
        + enc("<|User|>:Q2\n<|Bot|>:")
        + enc("A2")
        + [EOS]
        + enc("\n")
        + [BOS]
        + enc("<|User|>:Q3\n<|Bot|>:")
    )
    chat = Chat(talking.model, talking.tok, "internlm2_chat", system="S")
    chat.history = [{"input": "Q1", "output": "A1"}, {"input": "Q2", "output": "A2"}]
    assert chat.prompt_ids("Q3") == chatml("S", [("Q1", "A1"), ("Q2", "A2"), ("Q3", None)], enc)
    assert chat.conversation()[0]["system"] == "S" and "system" not in chat.conversation()[1]


def test_answer_is_greedy_streamed_and_ends_at_the_stop_token(talking):
    model, tok = talking.model, talking.tok
    chat = Chat(model, tok, "internlm2_chat", system=SYSTEM, settings=GenerationSettings(max_new_tokens=MAX))
    pieces: list[str] = []
    answer = chat.ask("Who are you?", stream=pieces.append)
    [ref] = generate_answers(model, tok, "internlm2_chat", ["Who are you?"], system=SYSTEM, max_new_tokens=MAX)
    assert ref.stopped and ref.new_tokens < MAX  # the test model's property: this one ends on <|im_end|>
    assert answer == ref.answer and len(answer.split()) > 1
    assert len(pieces) > 1 and "".join(pieces).rstrip() == answer  # word by word, without the stop token
    assert chat.history == [{"input": "Who are you?", "output": answer}]


def test_later_turns_see_the_history_and_reset_forgets_it(talking):
    model, tok = talking.model, talking.tok
    chat = Chat(model, tok, "internlm2_chat", system=SYSTEM, settings=GenerationSettings(max_new_tokens=MAX))
    first = chat.ask("Who are you?")
    second = chat.ask("What is your name?")
    ids = chatml(SYSTEM, [("Who are you?", first), ("What is your name?", None)], talking.enc)
    assert second == argmax_answer(model, tok, ids)
    [alone] = greedy(model, tok, ["What is your name?"])
    assert second != alone  # the history changed the answer
    chat.reset()
    assert chat.history == [] and chat.ask("What is your name?") == alone


def test_stream_yields_the_growing_answer_then_the_answer(talking):
    chat = Chat(
        talking.model, talking.tok, "internlm2_chat", system=SYSTEM, settings=GenerationSettings(max_new_tokens=MAX)
    )
    steps = list(chat.stream("你是谁"))
    [want] = greedy(talking.model, talking.tok, ["你是谁"])
    assert steps[-1] == want and len(steps) > 2
    assert all(b.startswith(a) for a, b in itertools.pairwise(steps[:-1]))
    assert steps[-2].rstrip() == want


def test_read_prompt_joins_lines_ending_in_a_backslash():
    lines = iter(["one\\", "two\\", "three", "four"])

    def read(prompt):
        return next(lines, None)

    assert read_prompt(read) == "one\ntwo\nthree"
    assert read_prompt(read) == "four"
    assert read_prompt(read) is None


def test_repl_streams_on_a_terminal_and_obeys_commands(talking):
    writes: list[str] = []

    class Terminal(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    chat = Chat(
        talking.model, talking.tok, "internlm2_chat", system=SYSTEM, settings=GenerationSettings(max_new_tokens=MAX)
    )
    lines = iter(["Who are you?", "/reset", "", "What is", "/exit", "never asked"])
    repl(chat, lambda prompt: next(lines, None), Terminal(), stream=True)
    first, what_is = greedy(talking.model, talking.tok, ["Who are you?", "What is"])
    answers = "".join(writes).splitlines()
    assert answers == [first, what_is]  # /reset forgot the first turn; "" asked nothing; /exit quit
    assert len(writes) > 4  # streamed: pieces of the answers, then a newline each
    assert chat.history == [{"input": "What is", "output": what_is}]
    assert next(lines) == "never asked"


def test_a_conversation_beyond_the_context_asks_for_a_reset(talking, capsys):
    chat = Chat(talking.model, talking.tok, "internlm2_chat", settings=GenerationSettings(max_new_tokens=MAX))
    chat.history = [{"input": "word " * 600, "output": "answer"}] * 2  # 2 x 600 tokens; the context is 1024
    lines = iter(["Q", "/reset", "Who are you?"])
    out = io.StringIO()
    repl(chat, lambda prompt: next(lines, None), out, stream=False)
    assert "the model's context is 1024: /reset it" in capsys.readouterr().err
    assert out.getvalue().splitlines() == greedy(talking.model, talking.tok, ["Who are you?"], system="")


def test_stop_ends_the_generation_and_keeps_the_answer_so_far(talking):
    """Setting ``stop`` (Ctrl-C, the page's Stop) ends the generation after the current token; the
    partial answer is returned and stays in the history, so the next turn continues after it."""
    model, tok = talking.model, talking.tok
    chat = Chat(model, tok, "internlm2_chat", system=SYSTEM, settings=GenerationSettings(max_new_tokens=MAX))
    pieces: list[str] = []
    partial = chat.ask("Who are you?", stream=lambda text: (pieces.append(text), chat.stop.set()))
    [full] = greedy(model, tok, ["Who are you?"])
    assert chat.stopped and partial == "".join(pieces).strip()  # what was streamed is what is kept
    assert full.startswith(partial) and len(partial.split()) < len(full.split())
    assert chat.history == [{"input": "Who are you?", "output": partial}]
    assert chat.prompt_ids("Q") == chatml(SYSTEM, [("Who are you?", partial), ("Q", None)], talking.enc)
    assert not chat.stop.is_set() and chat.ask("Who are you?") and not chat.stopped  # the next answer runs


def test_ctrl_c_stops_the_answer_and_at_the_prompt_quits(talking):
    """Real SIGINTs to this process: the first while an answer streams stops it and the conversation
    goes on; the next, at the prompt, ends the loop without an exception, the history kept."""
    chat = Chat(
        talking.model, talking.tok, "internlm2_chat", system=SYSTEM, settings=GenerationSettings(max_new_tokens=MAX)
    )
    writes: list[str] = []

    class Terminal(io.StringIO):
        def write(self, text: str) -> int:
            if not writes:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C once the first words are on the screen
            writes.append(text)
            return len(text)

    def read_line(prompt: str) -> str | None:
        if not chat.history:
            return "Who are you?"
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C at the prompt: input() raises KeyboardInterrupt
        return "never asked"

    try:
        repl(chat, read_line, Terminal(), stream=True)
    except KeyboardInterrupt:  # not left to end the test run
        pytest.fail("Ctrl-C escaped the chat loop")
    [full] = greedy(talking.model, talking.tok, ["Who are you?"])
    [(question, partial)] = [(t["input"], t["output"]) for t in chat.history]
    assert question == "Who are you?" and full.startswith(partial) and 0 < len(partial) < len(full)
    assert "".join(writes).strip() == partial and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_help_and_unknown_commands_never_reach_the_model(talking, capsys):
    chat = Chat(talking.model, talking.tok, "internlm2_chat", settings=GenerationSettings(max_new_tokens=MAX))
    lines = iter(["/help", "/halp", "/exit"])
    out = io.StringIO()
    repl(chat, lambda prompt: next(lines, None), out, stream=False)
    err = capsys.readouterr().err
    assert HELP in err and "/reset" in HELP and "Ctrl-C" in HELP
    assert "(unknown command /halp: /help lists the commands)" in err
    assert chat.history == [] and out.getvalue() == ""  # nothing was asked


# ---------------------------------------------------------------- the command


@pytest.mark.slow
def test_cli_reads_stdin_keeps_history_resets_and_exits(talking, tmp_path):
    """An experiment name: its results/<exp>/merged, its template and SYSTEM; prompts piped in."""
    config = {
        "run": ["talk"],
        "models": {"talk": {"source": "local", "path": str(talking.base)}},
        "datasets": {"data": {"format": "xtuner", "path": str(XTUNER / "data.json")}},
        "experiments": {
            "talk": {"model": "talk", "dataset": "data", "train": {"template": "internlm2_chat", "SYSTEM": SYSTEM}}
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "results" / "talk").mkdir(parents=True)
    (tmp_path / "results" / "talk" / "merged").symlink_to(talking.merged)
    stdin = "Who are you?\nWhat is your name?\n/reset\nWhat is your name?\nline one\\\nline two\n/exit\nnot asked\n"
    res = run_cli("chat", "talk", "--config", "config.yaml", "--max-new-tokens", MAX, input=stdin, cwd=tmp_path)

    model, tok = load_model(talking.merged)
    first, alone = greedy(model, tok, ["Who are you?", "What is your name?"])
    second = argmax_answer(
        model, tok, chatml(SYSTEM, [("Who are you?", first), ("What is your name?", None)], talking.enc)
    )
    multi = argmax_answer(
        model, tok, chatml(SYSTEM, [("What is your name?", alone), ("line one\nline two", None)], talking.enc)
    )
    assert res.stdout.splitlines() == [first, second, alone, multi]
    assert first and second != alone  # non-empty; the history mattered


@pytest.mark.slow
def test_cli_on_directories_merged_and_base_with_adapter(talking):
    """A merged directory needs no --prompt-template: its saved chat template is the training format,
    also for the second turn; a base model with --adapter answers as the PEFT model does."""
    stdin = "Who are you?\nWhat is your name?\n"
    res = run_cli("chat", talking.merged, "--max-new-tokens", MAX, input=stdin)
    model, tok = load_model(talking.merged)
    [first] = greedy(model, tok, ["Who are you?"], system="")
    ids = chatml("", [("Who are you?", first), ("What is your name?", None)], talking.enc)
    assert res.stdout.splitlines() == [first, argmax_answer(model, tok, ids)]  # answers only: banner on stderr
    assert "/reset" in res.stderr

    res = run_cli(
        "chat",
        talking.base,
        "--adapter",
        talking.adapter,
        "--prompt-template",
        "internlm2_chat",
        "--system",
        SYSTEM,
        "--max-new-tokens",
        MAX,
        input="Who are you?\n",
    )
    peft = load_peft_model(load_base(talking.base, "float32"), talking.adapter)
    assert res.stdout.splitlines() == greedy(peft, tok, ["Who are you?"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU --bits 4 loads")
def test_bits_4_is_refused_on_cpu(talking, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["chat", str(talking.base), "--bits", "4"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "--bits 4" in err and "CUDA GPU" in err


@pytest.mark.parametrize(
    "files, lacks",
    [([], "no config.json, no tokenizer files"), (["config.json", "tokenizer.json"], "no weights")],
)
def test_a_directory_that_is_not_a_model_is_refused_in_one_line(tmp_path, capsys, files, lacks):
    for name in files:
        shutil.copy(TINY_BASE / name, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["chat", str(tmp_path)])
    assert exit_.value.code == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"ConfigError: {tmp_path} is not a model directory: it has {lacks}" in line and "Hint:" in line


def test_an_adapter_directory_that_is_not_one_is_refused_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["chat", str(TINY_BASE), "--adapter", str(tmp_path), "--prompt-template", "internlm2_chat"])
    assert exit_.value.code == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"ConfigError: {tmp_path} is not an adapter directory: it has no adapter_config.json" in line


class Payload:
    """Creates a file when unpickled by anything that runs a pickle's code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickled_model_file_holding_code_is_refused_naming_it(tmp_path, capsys):
    from safetensors.torch import load_file

    model = tmp_path / "model"
    shutil.copytree(TINY_BASE, model, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "ran"
    torch.save({**load_file(TINY_BASE / "model.safetensors"), "x": Payload(marker)}, model / "pytorch_model.bin")
    with pytest.raises(SystemExit) as exit_:
        main(["chat", str(model), "--prompt-template", "internlm2_chat"])
    assert exit_.value.code == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"UnsafeCheckpoint: {model / 'pytorch_model.bin'}: refused to load" in line
    assert "(io.open)" in line and "if you trust where the file came from" in line  # what it asked for, the way
    assert "Weights only load failed" not in line and not marker.exists()  # not torch's advice; nothing ran


@pytest.mark.slow
def test_terminal_session_prompts_answers_and_quits_on_eof(talking):
    """On a terminal: a >>> prompt, the answer, the next prompt; Ctrl-C (a SIGINT to the process) while
    an answer is written stops it and gives the prompt back; /help answers; Ctrl-D quits."""
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "dumb"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "snaketune.cli",
            "chat",
            str(talking.base),
            "--prompt-template",
            "internlm2_chat",
            "--system",
            SYSTEM,
            "--max-new-tokens",
            str(LONG),
        ],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        close_fds=True,
    )
    os.close(follower)
    seen = b""

    def read_until(marker: bytes, start: int = 0, timeout: float = 120) -> None:
        nonlocal seen
        end = time.monotonic() + timeout
        while marker not in seen[start:]:
            assert time.monotonic() < end, f"no {marker!r} in {seen[-2000:]!r}"
            if select.select([leader], [], [], 1)[0]:
                seen += os.read(leader, 4096)

    try:
        read_until(b">>> ")
        mark = len(seen)
        os.write(leader, b"Who are you?\n")
        read_until(b">>> ", mark)
        long = len(seen)
        os.write(leader, "你是谁\n".encode())  # a long answer after this history
        read_until("你是谁\r\n".encode(), long)
        echoed = len(seen)
        read_until(b" ", echoed)  # the first words of the answer are on the screen
        os.kill(proc.pid, signal.SIGINT)
        read_until(b"(stopped; the answer so far stays in the history)", echoed)
        read_until(b">>> ", echoed)
        os.write(leader, b"/help\n/halp\n")
        read_until(b"(unknown command /halp: /help lists the commands)\r\n>>> ", echoed)
        os.write(leader, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(leader)
    [want] = greedy(talking.model, talking.tok, ["Who are you?"], max_new_tokens=LONG)
    session = seen[mark:].decode().replace("\r\n", "\n")
    assert f"Who are you?\n{want}\n>>> " in session  # the echoed question, the answer, the next prompt
    stopped = seen[echoed:].decode().replace("\r\n", "\n")
    partial = stopped.split("\n")[0]
    assert partial.strip() and stopped.startswith(f"{partial}\n(stopped; the answer so far stays in the history)\n>>> ")
    assert HELP in stopped and "Traceback" not in session
