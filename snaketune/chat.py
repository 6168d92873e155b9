"""``snaketune chat``: a multi-turn conversation with a model, encoded exactly as training encoded one.

Like ``xtuner chat``. The history is a list of XTuner ``conversation`` turns
(``{"input", "output"}``; the system prompt goes on turn 0), and every
prompt is that conversation plus the new question run through
:func:`snaketune.encoding.encode_conversation`, the training encoder: turn 0
gets system + instruction, later turns the instruction only, and each answer
is followed by the template's suffix (or EOS, and BOS for the next turn) and
separator, token for token as in training. Generation stops on
:func:`snaketune.encoding.stop_token_ids`.

Greedy by default (``temperature=0``): the same question gets the same
answer, as in ``snaketune evaluate``. XTuner samples (temperature 0.1, top-p
0.75, top-k 40); ``temperature=0.1`` here gives that.

An answer stops early when :attr:`Chat.stop` is set (Ctrl-C in the terminal,
Stop on the web page): generation ends after the token being computed, and
the partial answer is kept in the history, as it stays on the screen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from .devices import placement_here
from .encoding import IGNORE_INDEX, encode_conversation, resolve_template, stop_token_ids
from .errors import ConfigError, ConversationTooLong, UnsafeCheckpoint
from .model import load_base, load_peft_model, load_tokenizer
from .templates import TOKENIZER_TEMPLATE, PromptTemplate

log = logging.getLogger(__name__)

Turn = dict[str, Any]

COMMANDS = (
    "/help lists the commands, /reset clears the history, /exit (or Ctrl-D) quits; Ctrl-C stops an answer; "
    "end a line with \\ to continue on the next"
)
HELP = """/help        this list
/reset       clear the history (start a new conversation)
/exit        quit (also Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C       while an answer is written: stop it (what was written stays in the history)
a line ending in \\ continues on the next; a line that is one /word is a command, any other goes to the model"""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.75  # XTuner's; used only when sampling
    top_k: int = 40  # XTuner's; used only when sampling

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return dict(do_sample=False, max_new_tokens=self.max_new_tokens)
        return dict(
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
        )


class Chat:
    """One conversation with a model: ``ask`` a question, get the answer, the history grows."""

    def __init__(
        self,
        model,
        tokenizer,
        template: PromptTemplate | str,
        *,
        system: str = "",
        settings: GenerationSettings | None = None,
        history: list[Turn] | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.template = resolve_template(template)
        self.system = system
        self.settings = settings or GenerationSettings()
        self.history: list[Turn] = list(history or [])
        self.stop = threading.Event()  # set: the answer being generated ends after its current token
        self.stopped = False  # the last answer was cut short by ``stop``
        self.stops = stop_token_ids(tokenizer, self.template)
        if self.template == TOKENIZER_TEMPLATE:  # no stop words: the model's generation config names them
            extra = model.generation_config.eos_token_id
            self.stops += [t for t in ([extra] if isinstance(extra, int) else extra or []) if t not in self.stops]

    def reset(self) -> None:
        self.history.clear()

    def conversation(self, question: str | None = None) -> list[Turn]:
        """The history (plus an unanswered question) as an XTuner conversation, system on turn 0."""
        turns = [dict(t) for t in self.history]
        if question is not None:
            turns.append({"input": question, "output": ""})
        if turns and self.system:
            turns[0]["system"] = self.system
        return turns

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids the model continues: the conversation so far and the question, as training encodes it.

        The encoder is given the question with an empty answer, and only that
        answer supervised; its first supervised token is where the answer starts.
        """
        turns = [{**t, "output_with_loss": False} for t in self.conversation(question)]
        turns[-1]["output_with_loss"] = True
        enc = encode_conversation(turns, self.tokenizer, self.template, max_length=sys.maxsize)
        start = next((i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX), len(enc.input_ids))
        return enc.input_ids[:start]

    def ask(self, question: str, stream: Callable[[str], None] | None = None) -> str:
        """The answer to ``question`` in the context of the history, which then holds both.

        ``stream`` receives the answer's text piece by piece while it is generated.
        Setting :attr:`stop` ends it early: the answer so far is returned and kept,
        and :attr:`stopped` says so.
        """
        ids = self.prompt_ids(question)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and len(ids) >= limit:
            raise ConversationTooLong(
                f"the conversation is {len(ids)} tokens, the model's context is {limit}: /reset it"
            )
        device = next(self.model.parameters()).device
        inputs = torch.tensor([ids], device=device)
        self.model.eval()
        with torch.no_grad():
            out = self.model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                eos_token_id=self.stops,
                pad_token_id=self.tokenizer.pad_token_id,
                use_cache=True,
                streamer=stream and _Streamer(self.tokenizer, self.stops, stream),
                stopping_criteria=StoppingCriteriaList([_StopWhenSet(self.stop)]),
                **self.settings.generate_kwargs(),
            )
        new = out[0, len(ids) :].tolist()
        finished = bool(new) and new[-1] in self.stops
        if finished:
            new = new[:-1]
        self.stopped = self.stop.is_set() and not finished and len(new) < self.settings.max_new_tokens
        self.stop.clear()
        answer = self.tokenizer.decode(new, skip_special_tokens=False).strip()
        self.history.append({"input": question, "output": answer})
        return answer

    def stream(self, question: str) -> Iterator[str]:
        """``ask`` as a generator of the answer so far (for the web page); the last item is the answer.

        Closing the generator early (the page's Stop) stops the generation too, not only its display.
        """
        pieces: queue.Queue = queue.Queue()
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["answer"] = self.ask(question, stream=pieces.put)
                if self.stopped:  # the server's log shows that a Stop ended the generation itself
                    log.info("answer stopped after %d words", len(result["answer"].split()))
            except Exception as err:  # re-raised in the caller's thread
                result["error"] = err
            finally:
                pieces.put(None)

        threading.Thread(target=work, daemon=True).start()
        text = ""
        try:
            while (piece := pieces.get()) is not None:
                text += piece
                yield text
        except GeneratorExit:
            self.stop.set()
            raise
        if "error" in result:
            raise result["error"]
        yield result["answer"]


class _StopWhenSet(StoppingCriteria):
    """Ends generation, checked after every token, once ``event`` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _Streamer(TextStreamer):
    """Decoded text to a callback as it is generated (whole words), without the stop token and, like
    the answer ``ask`` returns, without leading whitespace."""

    def __init__(self, tokenizer, stops: list[int], callback: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=False)
        self.stops, self.callback, self.started = torch.tensor(stops), callback, False

    def put(self, value) -> None:
        if not self.next_tokens_are_prompt:
            value = value.reshape(-1)
            value = value[~torch.isin(value, self.stops)]
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        text = text if self.started else text.lstrip()
        if text:
            self.started = True
            self.callback(text)


# ---------------------------------------------------------------- loading


# What a model directory must hold: transformers' own names (a sharded model's index counts as its weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "*.tiktoken")
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def check_model_dir(model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None) -> None:
    """Refuse, in one line, a directory that is not a model (or an adapter directory that is not one),
    before transformers tries and fails somewhere deep in a tokenizer conversion."""
    d = Path(model_dir)
    lacks = [] if (d / "config.json").is_file() else ["config.json"]
    if not any(any(d.glob(pattern)) for pattern in TOKENIZER_FILES):
        lacks.append("tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    if not any(any(d.glob(pattern)) for pattern in WEIGHT_FILES):
        lacks.append("weights (*.safetensors or pytorch_model.bin)")
    if lacks:
        raise ConfigError(
            f"{d} is not a model directory: it has no {', no '.join(lacks)}",
            hint="give a merged model (results/EXPERIMENT/merged), a base model directory with --adapter, "
            "or an experiment name",
        )
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(
            f"{adapter} is not an adapter directory: it has no adapter_config.json",
            hint="give --adapter a PEFT adapter directory (results/EXPERIMENT/adapter)",
        )


def load_model(
    model_dir: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    bits: int | None = None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) for chatting where evaluate would answer (:func:`snaketune.devices.placement_here`):
    fp32 on the CPU; on a GPU in half precision, or NF4 with ``bits=4``."""
    if bits not in (None, 4):
        raise ConfigError(f"--bits {bits}: only 4 (NF4) is supported")
    place = placement_here(None, model_dir)
    if bits == 4 and place.device != "cuda":
        raise ConfigError(
            "--bits 4 loads the model in 4-bit NF4 with bitsandbytes on a CUDA GPU, and there is none "
            "here; leave --bits out to chat in fp32 on the CPU"
        )
    check_model_dir(model_dir, adapter)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    try:
        quantization = "nf4" if bits == 4 else "none"  # NF4 computes in the GPU's compute dtype
        model = load_base(model_dir, place.dtype, trust_remote_code, quantization=quantization, device=place.device)
    except pickle.UnpicklingError as err:  # transformers reads .bin weights with weights_only=True
        raise refused_pickle(model_dir, err) from None
    if adapter:
        model = load_peft_model(model, adapter)
    return model.eval(), tokenizer


def refused_pickle(model_dir: str | os.PathLike, err: pickle.UnpicklingError) -> UnsafeCheckpoint:
    """The error for a pickled weights file that holds more than tensors, naming the file (torch's
    message does not) and what it asked for."""
    from .safe_pickle import load_weights

    wanted = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    culprit: Path | str = Path(model_dir) / "pytorch_model.bin"
    for path in sorted(Path(model_dir).glob("*.bin")):
        try:
            load_weights(path)
        except pickle.UnpicklingError:
            culprit = path
            break
    return UnsafeCheckpoint(
        f"{culprit}: refused to load: pickled weights that hold more than tensors"
        + (f" ({wanted[1]})" if wanted else "")
        + ": only tensors are unpickled, so that no code in a pickle can run, and no option unpickles more",
        hint="if you trust where the file came from, convert it to model.safetensors yourself "
        "(torch.load(FILE, weights_only=False), then safetensors' save_file) and remove the .bin",
    )


# ---------------------------------------------------------------- the terminal


def read_prompt(read_line: Callable[[str], str | None]) -> str | None:
    """One prompt: lines ending in ``\\`` continue on the next; ``None`` at end of input."""
    lines: list[str] = []
    while (line := read_line("... " if lines else ">>> ")) is not None:
        if not line.endswith("\\"):
            return "\n".join([*lines, line])
        lines.append(line[:-1])
    return "\n".join(lines) if lines else None


def repl(chat: Chat, read_line: Callable[[str], str | None], out: TextIO, *, stream: bool) -> None:
    """Answer prompts until ``/exit``, end of input or Ctrl-C at the prompt; ``/reset`` starts the
    conversation over, ``/help`` lists the commands. Ctrl-C while an answer is written stops that answer
    (:func:`ctrl_c_stops`); a second one before it has stopped quits."""
    try:
        while (prompt := read_prompt(read_line)) is not None:
            command = prompt.strip()
            if re.fullmatch(r"/\w+", command):
                if command == "/exit":
                    return
                run_command(chat, command)
            elif command:
                answer(chat, prompt, out, stream=stream)
    except KeyboardInterrupt:
        print(file=sys.stderr, flush=True)


def run_command(chat: Chat, command: str) -> None:
    """``/reset``, ``/help``, or a word that is none of them: never sent to the model."""
    if command == "/reset":
        chat.reset()
        print("(history cleared)", file=sys.stderr, flush=True)
    elif command == "/help":
        print(HELP, file=sys.stderr, flush=True)
    else:
        print(f"(unknown command {command}: /help lists the commands)", file=sys.stderr, flush=True)


def answer(chat: Chat, prompt: str, out: TextIO, *, stream: bool) -> None:
    """The answer to one prompt on ``out``, whole or streamed; a stopped one says so on stderr."""
    try:
        with ctrl_c_stops(chat):
            if stream:
                chat.ask(prompt, stream=lambda text: print(text, end="", file=out, flush=True))
                print(file=out, flush=True)
            else:
                print(chat.ask(prompt), file=out, flush=True)
    except ConversationTooLong as err:
        print(f"({err})", file=sys.stderr, flush=True)
        return
    if chat.stopped:
        print("(stopped; the answer so far stays in the history)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def ctrl_c_stops(chat: Chat) -> Iterator[None]:
    """Within: Ctrl-C (SIGINT) sets ``chat.stop`` instead of raising, so the answer being generated
    ends after its current token and the history is kept; a second Ctrl-C raises KeyboardInterrupt.
    Signal handlers belong to the main thread: elsewhere this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum, frame) -> None:
        if chat.stop.is_set():
            raise KeyboardInterrupt
        chat.stop.set()

    chat.stop.clear()
    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def terminal_reader(interactive: bool) -> Callable[[str], str | None]:
    """``input()`` with its line editing on a terminal; plain lines from stdin otherwise."""

    def from_terminal(prompt: str) -> str | None:
        try:
            return input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return None

    def from_pipe(prompt: str) -> str | None:
        line = sys.stdin.readline()
        return line.rstrip("\r\n") if line else None

    if interactive:
        import readline  # noqa: F401  (gives input() history and editing)
    return from_terminal if interactive else from_pipe
