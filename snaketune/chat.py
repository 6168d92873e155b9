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
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from transformers import AutoModelForCausalLM, TextStreamer

from .encoding import IGNORE_INDEX, encode_conversation, resolve_template, stop_token_ids
from .errors import ConfigError, ConversationTooLong
from .model import compute_dtype, load_base, load_peft_model, load_tokenizer, nf4_config, pick_device
from .templates import TOKENIZER_TEMPLATE, PromptTemplate

Turn = dict[str, Any]

COMMANDS = "/reset clears the history, /exit (or Ctrl-D) quits; end a line with \\ to continue on the next"


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
                **self.settings.generate_kwargs(),
            )
        new = out[0, len(ids) :].tolist()
        if new and new[-1] in self.stops:
            new = new[:-1]
        answer = self.tokenizer.decode(new, skip_special_tokens=False).strip()
        self.history.append({"input": question, "output": answer})
        return answer

    def stream(self, question: str) -> Iterator[str]:
        """``ask`` as a generator of the answer so far (for the web page); the last item is the answer."""
        pieces: queue.Queue = queue.Queue()
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["answer"] = self.ask(question, stream=pieces.put)
            except Exception as err:  # re-raised in the caller's thread
                result["error"] = err
            finally:
                pieces.put(None)

        threading.Thread(target=work, daemon=True).start()
        text = ""
        while (piece := pieces.get()) is not None:
            text += piece
            yield text
        if "error" in result:
            raise result["error"]
        yield result["answer"]


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


def load_model(
    model_dir: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    bits: int | None = None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) for chatting: fp32 on the CPU; on a GPU its compute dtype, or NF4 with ``bits=4``."""
    device = pick_device()
    if bits not in (None, 4):
        raise ConfigError(f"--bits {bits}: only 4 (NF4) is supported")
    if bits == 4 and device != "cuda":
        raise ConfigError(
            "--bits 4 loads the model in 4-bit NF4 with bitsandbytes on a CUDA GPU, and there is none "
            "here; leave --bits out to chat in fp32 on the CPU"
        )
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    if device == "cpu":
        model = load_base(model_dir, "float32", trust_remote_code)
    else:
        dtype = compute_dtype(device)
        quant = nf4_config(dtype) if bits == 4 else None
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            quantization_config=quant,
            device_map={"": torch.cuda.current_device()},
            trust_remote_code=trust_remote_code,
        )
    if adapter:
        model = load_peft_model(model, adapter)
    return model.eval(), tokenizer


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
    """Answer prompts until ``/exit`` or end of input; ``/reset`` starts the conversation over."""
    while (prompt := read_prompt(read_line)) is not None:
        command = prompt.strip()
        if command == "/exit":
            return
        if command == "/reset":
            chat.reset()
            print("(history cleared)", file=sys.stderr, flush=True)
            continue
        if not command:
            continue
        try:
            if stream:
                chat.ask(prompt, stream=lambda text: print(text, end="", file=out, flush=True))
                print(file=out, flush=True)
            else:
                print(chat.ask(prompt), file=out, flush=True)
        except ConversationTooLong as err:
            print(f"({err})", file=sys.stderr, flush=True)


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
