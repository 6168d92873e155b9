"""``snaketune web``: the chat in a browser page (Gradio), answering with the terminal's :class:`Chat`.

The page streams each answer, keeps the conversation (the browser holds it
and sends it with every question; it is re-encoded exactly as the terminal
chat encodes its history), shows the system prompt and the generation
settings (editable) and can clear the conversation. One answer is generated
at a time; further questions wait in Gradio's queue. Stop ends the generation
itself, not only its display (:meth:`Chat.stream`).

Anyone who reaches the port can use the model unless a login is required
(``--auth USER:PASS``); the command checks the port before loading the model.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # gradio, torch and the model come with build_app: the checks before loading need none
    import gradio as gr

    from .chat import GenerationSettings, Turn
    from .templates import PromptTemplate

log = logging.getLogger(__name__)

AUTH_VARIABLE = "SNAKETUNE_WEB_AUTH"  # USER:PASS, when --auth is not given (a command line is visible in ps)


def _text(content: Any) -> str:
    """A Gradio message's text: a string, or a list of content blocks."""
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if isinstance(block, dict))


def turns_of(history: list[dict]) -> list[Turn]:
    """Gradio's message list (user, assistant, user, ...) as XTuner conversation turns."""
    turns: list[Turn] = []
    for message in history:
        if message["role"] == "user":
            turns.append({"input": _text(message["content"]), "output": ""})
        elif message["role"] == "assistant" and turns:
            turns[-1]["output"] += _text(message["content"])
    return turns


def build_app(
    model, tokenizer, template: PromptTemplate | str, *, system: str, settings: GenerationSettings, title: str
) -> gr.Blocks:
    """The chat page for one loaded model."""
    import gradio as gr

    from .chat import Chat, GenerationSettings

    template_name = template if isinstance(template, str) else template.name

    def answer(
        message: str, history: list[dict], system: str, max_new_tokens: float, temperature: float, top_p: float
    ) -> Iterator[str]:
        chat = Chat(
            model,
            tokenizer,
            template,
            system=system,
            history=turns_of(history),
            settings=GenerationSettings(
                max_new_tokens=int(max_new_tokens), temperature=temperature, top_p=top_p, top_k=settings.top_k
            ),
        )
        yield from chat.stream(message)

    with gr.Blocks(title=f"snaketune chat: {title}", analytics_enabled=False) as app:
        gr.Markdown(f"### {title}\nprompt template `{template_name}`; temperature 0 is greedy decoding")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):  # the settings, always in view
                settings_inputs = [
                    gr.Textbox(system, label="System prompt", lines=3, elem_id="system"),
                    gr.Slider(
                        1, 4096, value=settings.max_new_tokens, step=1, label="max new tokens", elem_id="max-new-tokens"
                    ),
                    gr.Slider(0, 2, value=settings.temperature, step=0.05, label="temperature", elem_id="temperature"),
                    gr.Slider(0.05, 1, value=settings.top_p, step=0.05, label="top-p (when sampling)", elem_id="top-p"),
                ]
            with gr.Column(scale=3):
                gr.ChatInterface(
                    answer,
                    chatbot=gr.Chatbot(label="conversation", height=460, elem_id="conversation"),
                    textbox=gr.Textbox(
                        placeholder="Ask something and press Enter",
                        show_label=False,
                        elem_id="question",
                        autofocus=True,
                        stop_btn=True,  # shown while an answer is generated; it ends the generation
                    ),
                    additional_inputs=settings_inputs,
                    concurrency_limit=1,
                    analytics_enabled=False,
                    fill_height=False,
                )
    return app


def check_address(host: str, port: int) -> None:
    """Refuse an address that cannot be served (a port in use, a host not of this machine) before the
    model is loaded, not after."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ConfigError(
            f"--host {host}: unknown host ({err.strerror})", hint="give an address of this machine"
        ) from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(address)
        except OSError as err:
            raise ConfigError(
                f"{host}:{port}: cannot serve the page there ({err.strerror})",
                hint="give an address of this machine"
                if err.errno == errno.EADDRNOTAVAIL
                else "choose another --port, or stop what listens on that one",
            ) from None


def login(auth: str | None) -> tuple[str, str] | None:
    """``USER:PASS`` (from --auth, else $SNAKETUNE_WEB_AUTH) as Gradio's auth pair; None: no login."""
    auth = auth if auth is not None else os.environ.get(AUTH_VARIABLE)
    if not auth:
        return None
    user, sep, password = auth.partition(":")
    if not (sep and user and password):
        raise ConfigError("--auth: expected USER:PASS, both non-empty", hint="for example --auth alice:a-long-secret")
    return user, password


def warn_if_open(host: str, auth: tuple[str, str] | None) -> None:
    """On stderr: a page served beyond this machine without a login is anyone's who reaches it."""
    if auth is not None:
        return
    try:
        address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror:
        return  # check_address refuses it
    if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
        log.warning(
            "--host %s without --auth: anyone who reaches this port can use the model; "
            "require a login with --auth USER:PASS (or $%s)",
            host,
            AUTH_VARIABLE,
        )


def serve(app: gr.Blocks, host: str, port: int, auth: tuple[str, str] | None = None) -> None:
    """Serve until interrupted. No share link, no server-side rendering (no Node.js needed); the page
    loads nothing from the internet (its fonts are Gradio's own), so it works on an offline cluster.
    Gradio's own banner is silenced: it suggests a share link, which this command does not offer."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's requests to itself while starting
    app.queue().launch(
        server_name=host,
        server_port=port,
        share=False,
        show_error=True,
        ssr_mode=False,
        auth=auth,
        quiet=True,
        prevent_thread_lock=True,
    )
    print(
        f"the chat page is on http://{host}:{port}{' (login required)' if auth else ''}; Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    app.block_thread()
