"""``snaketune web``: the chat in a browser page (Gradio), answering with the terminal's :class:`Chat`.

The page streams each answer, keeps the conversation (the browser holds it
and sends it with every question; it is re-encoded exactly as the terminal
chat encodes its history), shows the system prompt and the generation
settings (editable) and can clear the conversation. One answer is generated
at a time; further questions wait in Gradio's queue.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from .chat import Chat, GenerationSettings, Turn
from .templates import PromptTemplate


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
                    ),
                    additional_inputs=settings_inputs,
                    concurrency_limit=1,
                    analytics_enabled=False,
                    fill_height=False,
                )
    return app


def serve(app: gr.Blocks, host: str, port: int) -> None:
    """Serve until interrupted. No share link, no server-side rendering (no Node.js needed); the page
    loads nothing from the internet (its fonts are Gradio's own), so it works on an offline cluster."""
    app.queue().launch(server_name=host, server_port=port, share=False, show_error=True, ssr_mode=False)
