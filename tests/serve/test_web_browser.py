"""The chat page end to end: Debian's headless Chromium, driven by Playwright, against `llavakit serve` with the
demo model and an API key. Every request the page makes is recorded, and each must go to the server itself.

Needs `chromium` on PATH (apt-get install chromium) and Playwright's Python package (`playwright install` is not
needed: the system browser is used). Without them these tests fail, unless LLAVAKIT_SKIP_BROWSER=1. Set
LLAVAKIT_WEB_SCREENSHOT=PATH to keep the screenshot of a chat with a picture, an answer and its box
(docs/images/web-chat.png is made so)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from llavakit.eval.grounding import parse_boxes, square_to_image

from .harness import API_KEY, AUTH, ServeProcess, metric

SHAPES = Path(__file__).resolve().parents[2] / "examples" / "images" / "shapes.png"  # 480 x 320
ANSWER = ".turn.assistant"
TIMEOUT_MS = 20_000


def _chromium() -> str:
    """The system Chromium, or the reason the browser tests cannot run (fail, unless asked to skip)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        why = ("the browser tests need Debian's Chromium and Playwright's Python package: apt-get install -y chromium "
               "&& pip install -e '.[test]' (set LLAVAKIT_SKIP_BROWSER=1 to skip them)")
        if os.environ.get("LLAVAKIT_SKIP_BROWSER") == "1":
            pytest.skip(why)
        pytest.fail(why)
    return path


def _until(page, expression: str, timeout: float = 30) -> None:
    """Wait until a JavaScript expression is true, evaluated from here: Playwright's own wait_for_function polls
    through eval inside the page, which the page's Content-Security-Policy (script-src 'self') rightly refuses."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def demo():
    """`llavakit serve` with the demo model and an API key; one sequence at a time and no queue, so that a second
    request while one runs is refused (503) as on an overloaded server."""
    with ServeProcess("demo", "--served-model-name", "demo", "--api-key", API_KEY, "--max-num-seqs", "1",
                      "--max-queue", "0") as srv:
        yield srv


@pytest.fixture
def page(browser, demo):
    """A fresh page on the server, its API key entered; afterwards, no request went anywhere but the server."""
    context = browser.new_context(viewport={"width": 1000, "height": 860})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(demo.url + "/")
    page.fill("#key", API_KEY)
    page.click("#key-form button")
    _until(page, "document.querySelector('#model').value === 'demo'")
    yield page
    context.close()
    hosts = {urlsplit(u).hostname for u in requests if urlsplit(u).scheme not in ("data", "blob")}
    assert hosts == {"127.0.0.1"}, requests


def ask(page, question: str, answers: int) -> str:
    """Type `question`, send it with Enter, and wait for the `answers`-th answer to end; its text."""
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")
    page.wait_for_selector(f"{ANSWER}:nth-of-type({2 * answers}):is(.done, .stopped, .error)")
    return page.locator(ANSWER).nth(answers - 1).locator(".text").inner_text().strip()


def test_the_page_asks_for_the_key(browser, demo):
    context = browser.new_context()
    page = context.new_page()
    page.goto(demo.url + "/")
    page.wait_for_selector("#key-form:not([hidden])")
    assert "API key is missing" in page.inner_text("#key-message")
    page.fill("#key", "wrong")
    page.click("#key-form button")
    page.wait_for_selector("#key-form:not([hidden])")
    _until(page, "document.querySelector('#key-message').textContent.includes('not valid')")
    page.fill("#key", API_KEY)
    page.click("#key-form button")
    _until(page, "document.querySelector('#model').value === 'demo'")
    assert page.evaluate("sessionStorage.getItem('llavakit-api-key')") == API_KEY
    assert page.evaluate("localStorage.getItem('llavakit-api-key')") is None
    assert "context 1024 tokens" in page.inner_text("#status")
    context.close()


def test_ask_about_a_picture_over_several_turns(page, tmp_path):
    page.set_input_files("#file", str(SHAPES))
    page.wait_for_selector("#attachments img")
    page.fill("#temperature", "0")
    page.fill("#prompt", "What color")
    page.press("#prompt", "Shift+Enter")  # a new line, not a send
    assert page.input_value("#prompt") == "What color\n" and page.locator(ANSWER).count() == 0

    with page.expect_request("**/v1/chat/completions") as first:
        assert ask(page, "What color is the circle?", 1) == "Red."
    body = first.value.post_data_json
    assert body["stream"] is True and body["temperature"] == 0 and body["model"] == "demo"
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert first.value.headers["authorization"] == f"Bearer {API_KEY}"
    assert page.locator("#attachments img").count() == 0

    with page.expect_request("**/v1/chat/completions") as second:
        assert ask(page, "How many shapes are there?", 2) == "Two."
    messages = second.value.post_data_json["messages"]  # the same picture, the first turn and its answer
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0] == body["messages"][0] and messages[1]["content"].strip() == "Red."

    answer = ask(page, "Where is the blue square?", 3)  # a grounding answer: its box drawn on the picture
    (box,) = parse_boxes(answer)
    x1, y1, x2, y2 = square_to_image(box, (480, 320))
    drawn = page.locator(f"{ANSWER} .grounding .box")
    assert drawn.count() == 1 and drawn.inner_text() == "1"
    style = drawn.evaluate("b => [b.style.left, b.style.top, b.style.width, b.style.height].map(parseFloat)")
    assert style == pytest.approx([100 * x1 / 480, 100 * y1 / 320, 100 * (x2 - x1) / 480, 100 * (y2 - y1) / 320],
                                  abs=0.01)
    _until(page, "document.querySelector('.grounding img').complete")
    page.screenshot(path=os.environ.get("LLAVAKIT_WEB_SCREENSHOT") or tmp_path / "web-chat.png")

    page.click("#new-chat")
    assert page.locator(".turn").count() == 0
    with page.expect_request("**/v1/chat/completions") as fresh:
        ask(page, "Hello?", 1)
    assert len(fresh.value.post_data_json["messages"]) == 1


def test_stop_mid_answer(page, demo):
    """Stop aborts the stream: the answer stops growing at once, and the server stops generating."""
    def endless(route):  # the demo model's answers are short: ask for the whole context, past end-of-text
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    page.route("**/v1/chat/completions", endless)
    page.set_input_files("#file", str(SHAPES))
    page.fill("#prompt", "Describe the picture.")
    page.press("#prompt", "Enter")
    text = page.locator(f"{ANSWER} .text")
    lengths, deadline = [], time.monotonic() + 20
    while len(lengths) < 3:  # streamed: seen growing, piece by piece
        assert time.monotonic() < deadline, f"the answer did not grow: {lengths}"
        n = len(text.inner_text())
        if n and (not lengths or n > lengths[-1]):
            lengths.append(n)
    page.click("#stop")
    page.wait_for_selector(f"{ANSWER}.stopped")
    stopped = text.inner_text()
    assert page.is_visible("#send") and not page.is_visible("#stop")
    _wait_idle(demo)  # the rest of 1,000 tokens would take seconds more
    assert text.inner_text() == stopped and page.inner_text(f"{ANSWER} .note") == "(stopped)"
    assert len(stopped) < 2000


def test_a_file_that_is_not_a_picture(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n" * 10)
    page.set_input_files("#file", str(notes))
    with page.expect_response("**/v1/chat/completions") as response:
        ask(page, "What is this?", 1)
    assert response.value.status == 400
    message = response.value.json()["error"]["message"]
    assert message == "image 1 is not a PNG, JPEG, WEBP, GIF image; send one of those formats"
    assert page.inner_text(f"{ANSWER}.error .note") == message
    # the question and the file are back in the composer, to fix and resend
    assert page.input_value("#prompt") == "What is this?" and page.locator("#attachments img").count() == 1
    page.click("#attachments .remove")
    page.set_input_files("#file", str(SHAPES))
    page.fill("#temperature", "0")
    with page.expect_request("**/v1/chat/completions") as retry:
        assert ask(page, "What color is the circle?", 2) == "Red."
    assert len(retry.value.post_data_json["messages"]) == 1  # the failed turn is not part of the chat


def test_an_overloaded_server(page, demo):
    """While the one sequence the server runs is busy, the page shows the server's 503 message in place."""
    started, done = threading.Event(), threading.Event()

    def occupy():
        body = {"messages": [{"role": "user", "content": "Go on."}], "ignore_eos": True, "stream": True}
        with httpx.stream("POST", demo.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
            for _ in r.iter_lines():
                started.set()
                if done.is_set():
                    return  # closing the stream aborts the request

    worker = threading.Thread(target=occupy, daemon=True)
    worker.start()
    try:
        assert started.wait(20)
        with page.expect_response("**/v1/chat/completions") as response:
            ask(page, "Hello?", 1)
        assert response.value.status == 503
        assert "at capacity" in page.inner_text(f"{ANSWER}.error .note")
    finally:
        done.set()
        worker.join(20)
        _wait_idle(demo)


def _wait_idle(server) -> None:
    """Until the server runs nothing (an aborted request leaves the engine within a step)."""
    deadline = time.monotonic() + 2
    while metric(server.url, "llavakit_requests_in_flight") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server.url, "llavakit_requests_in_flight") == 0


def test_paste_and_drop_attach_pictures(page):
    page.evaluate("""() => {
        const transfer = () => { const t = new DataTransfer();
                                 t.items.add(new File(['not checked here'], 'x.png', {type: 'image/png'})); return t; };
        document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: transfer(), bubbles: true}));
        document.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer(), bubbles: true}));
    }""")
    _until(page, "document.querySelectorAll('#attachments img').length === 2")
