"""``snaketune web`` in a real browser: headless Chromium (Debian's) driven by Playwright.

The server is the real command on the tiny talking model, behind a login;
the page's answers must equal the model's greedy answers computed here
without the chat code (``generate_answers`` for a first turn, an argmax loop
over typed-out XTuner ids for a second). Skipped where Chromium or Playwright
is missing, except under CI=true, where that is a failure. The checks made
before the model loads (a busy port, an open host without a login) need no
browser.
"""

import logging
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from snaketune.chat import load_model
from snaketune.generation import generate_answers

from .chat_model import argmax_answer, build_talking_model, chatml
from .helpers import missing, run_cli

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SYSTEM = "You are Snaky."
MAX = 16
LONG = 4096  # the page's largest max new tokens: an answer a Stop interrupts on any machine
LOGIN = ("snaky", "a-long-secret")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        missing("chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -r requirements-dev.txt)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``snaketune web`` on the talking model, on a free port, behind ``--auth``; (url, model dir, its
    output so far)."""
    tmp = tmp_path_factory.mktemp("web")
    model = build_talking_model(tmp / "model", ends=False)  # every answer runs to its max new tokens
    output = tmp / "server.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "snaketune.cli",
            "web",
            str(model),
            "--prompt-template",
            "internlm2_chat",
            "--system",
            SYSTEM,
            "--max-new-tokens",
            str(MAX),
            "--port",
            str(port),
            "--auth",
            ":".join(LOGIN),
        ],
        stdout=output.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"snaketune web exited:\n{output.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "snaketune web did not answer within 120 s"
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield url, model, output.read_text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


WATCH = """n => {
    // record every text the n-th answer shows, until it is complete
    window.seen = [];
    window.observer = new MutationObserver(() => {
        const bots = document.querySelectorAll('[data-testid="bot"]');
        const text = bots.length === n ? bots[n - 1].innerText.trim() : null;
        if (text && window.seen[window.seen.length - 1] !== text) window.seen.push(text);
    });
    window.observer.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""
# complete: the n-th answer is there and the question box takes input again
DONE = """n => document.querySelectorAll('[data-testid="bot"]').length === n
            && !document.querySelector('#question textarea').disabled"""


def ask(page, question: str, n: int) -> list[str]:
    """Type the question and press Enter; every text the n-th answer showed, the final one last."""
    page.evaluate(WATCH, n)
    page.fill("#question textarea", question)
    page.press("#question textarea", "Enter")
    page.wait_for_function(DONE, arg=n, timeout=60_000)
    page.wait_for_timeout(300)  # a last update after the box is enabled would still be recorded
    return page.evaluate("() => { window.observer.disconnect(); return window.seen; }")


@pytest.mark.slow
@pytest.mark.browser
def test_page_streams_the_greedy_answers_keeps_history_clears_and_stops(browser, server, tmp_path):
    url, model_dir, server_output = server
    model, tok = load_model(model_dir)
    first, alone = (
        a.answer
        for a in generate_answers(
            model, tok, "internlm2_chat", ["Who are you?", "What is your name?"], system=SYSTEM, max_new_tokens=MAX
        )
    )
    second = argmax_answer(
        model,
        tok,
        chatml(
            SYSTEM,
            [("Who are you?", first), ("What is your name?", None)],
            lambda text: tok.encode(text, add_special_tokens=False),
        ),
    )
    assert second != alone

    page = browser.new_page(viewport={"width": 1100, "height": 760})
    elsewhere: list[str] = []  # the page must work offline (clusters): no fonts or scripts from the internet
    page.on("request", lambda request: None if request.url.startswith(url) else elsewhere.append(request.url))
    with pytest.raises(urllib.error.HTTPError) as refused:  # nothing of the app without the login
        urllib.request.urlopen(f"{url}config", timeout=10)
    assert refused.value.code == 401
    page.goto(url)
    page.fill("input[type=text]", LOGIN[0])
    page.fill("input[type=password]", LOGIN[1])
    page.click("button:has-text('Login')")
    page.wait_for_selector("#question textarea")
    # the system prompt and the generation settings are on the page
    assert page.input_value("#system textarea") == SYSTEM
    assert page.input_value("#max-new-tokens input[type=number]") == str(MAX)
    assert page.input_value("#temperature input[type=number]") == "0"

    seen = ask(page, "Who are you?", 1)
    assert seen[-1] == first
    seen = ask(page, "What is your name?", 2)
    assert seen[-1] == second  # the page sent the history
    assert all(second.startswith(text) for text in seen) and len(seen) > 1, seen  # streamed, word by word
    page.screenshot(path=str(tmp_path / "web.png"))

    page.click("#conversation button[aria-label='Clear']")
    page.wait_for_function("document.querySelectorAll('[data-testid=\"bot\"]').length === 0")
    assert ask(page, "What is your name?", 1)[-1] == alone  # a fresh conversation

    # Stop ends the generation itself (the server says so), not only what the page shows
    page.click("#conversation button[aria-label='Clear']")
    page.fill("#max-new-tokens input[type=number]", str(LONG))
    page.press("#max-new-tokens input[type=number]", "Enter")
    page.fill("#question textarea", "你是谁")  # an answer of LONG tokens unless stopped
    page.press("#question textarea", "Enter")
    page.wait_for_function("document.querySelector('[data-testid=\"bot\"]')?.innerText.trim()", timeout=60_000)
    page.click("#question button.stop-button")
    page.wait_for_function("!document.querySelector('#question textarea').disabled", timeout=60_000)
    shown = page.inner_text("[data-testid='bot']").split()
    deadline = time.monotonic() + 30
    while "answer stopped after" not in server_output() and time.monotonic() < deadline:
        time.sleep(0.2)
    [stopped] = [line for line in server_output().splitlines() if "answer stopped after" in line]
    # the server logs this only for a generation that a Stop ended before its end and its max new tokens
    assert 0 < len(shown) <= int(stopped.split("answer stopped after ")[1].split()[0]) < LONG, stopped
    assert elsewhere == []
    assert "share=True" not in server_output() and "login required" in server_output()  # no link it cannot make


def test_a_busy_port_or_a_host_elsewhere_is_refused_before_the_model_loads(tmp_path):
    """One line naming host:port, and the model is never loaded: MODEL here is an empty directory,
    which loading would refuse with another error. Serving beyond this machine without --auth warns;
    an address of no interface here asks for one that is."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_cli("web", tmp_path, "--host", "0.0.0.0", "--port", port, check=False)
    assert res.returncode == 1
    *_, warning, error = res.stderr.strip().splitlines()
    assert "WARNING" in warning and "--host 0.0.0.0 without --auth: anyone who reaches this port" in warning
    assert f"ConfigError: 0.0.0.0:{port}: cannot serve the page there (Address already in use)" in error
    assert "not a model directory" not in res.stderr and "Traceback" not in res.stderr
    res = run_cli("web", tmp_path, "--host", "192.0.2.1", "--auth", "a:b", check=False)  # TEST-NET: no machine's
    assert res.returncode == 1 and "Traceback" not in res.stderr
    [line] = res.stderr.strip().splitlines()
    assert "192.0.2.1:7860: cannot serve the page there" in line and "Hint: give an address of this machine" in line


def test_an_open_host_without_a_login_warns(caplog):
    from snaketune.web import login, warn_if_open

    with caplog.at_level(logging.WARNING, logger="snaketune"):
        warn_if_open("127.0.0.1", None)
        warn_if_open("localhost", None)
        warn_if_open("0.0.0.0", login("snaky:secret"))
        assert caplog.records == []
        warn_if_open("0.0.0.0", None)
    assert "anyone who reaches this port can use the model" in caplog.text
    for bad in ("snaky", "snaky:", ":secret"):
        with pytest.raises(ValueError, match="--auth: expected USER:PASS"):
            login(bad)
