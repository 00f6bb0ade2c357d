"""The chat page `serve` answers at /, driven in a real browser (Debian's chromium through
playwright): a streamed reply, Stop, reload, New chat, model markup shown as text, the API key,
a phone-width window, and no JavaScript errors on the console."""

from __future__ import annotations

import json
import re
import shutil
import time

import httpx
import pytest
from conftest import make_model_folder
from serving import running

CHROMIUM = "/usr/bin/chromium"
KEY = "mlx-openelm-chat"  # app.js's localStorage key
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need playwright: pip install -e '.[dev]'")
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"the browser tests need {CHROMIUM}: sudo apt-get install -y chromium "
                    "(playwright's own browser download is not used)")  # fmt: skip
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, spm_model):
    # EOS never wins greedy decoding and the context is long: a reply runs until Stop.
    folder = make_model_folder(tmp_path_factory.mktemp("webui") / "m", spm_model,
                               never_eos=True, max_context_length=2048)  # fmt: skip
    with running(str(folder), max_batch=2) as (url, engine):
        yield url, engine


@pytest.fixture
def page(browser, server):
    """A fresh browser context (empty localStorage) on the page; no console errors allowed.

    The page's CSP is bypassed: playwright's waits evaluate strings, and the renderer must be safe
    without that second wall (the markup test)."""
    context = browser.new_context(viewport={"width": 1100, "height": 800}, bypass_csp=True)
    page = context.new_page()
    page.errors = []
    page.on("console", lambda m: m.type == "error" and page.errors.append(m.text))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.set_default_timeout(20_000)
    yield page
    context.close()
    assert page.errors == []


def open_page(page, url, **settings):
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent !== ''")
    assert page.evaluate("document.activeElement.id") == "input"  # ready to type
    if settings:
        page.click("summary")
        for name, value in settings.items():
            page.fill("#" + name, str(value))
        page.click("summary")


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_reply(page, n):
    """Until the n-th reply has ended (finished, stopped or failed)."""
    page.wait_for_function(f"""document.querySelectorAll('.msg.assistant').length >= {n}
                               && document.getElementById('stop').hidden""")  # fmt: skip


def stored(page):
    return json.loads(page.evaluate(f"localStorage.getItem('{KEY}')"))


def running_count(url):
    return httpx.get(url + "/health").json()["running"]


def test_a_typed_message_streams_its_reply_in(page, server, monkeypatch):
    url, engine = server
    # A step at least 10 ms apart, so that even a loaded machine's browser sees the reply grow:
    # the tiny model alone can finish it before the page takes the first event.
    read = engine._read
    monkeypatch.setattr(engine, "_read", lambda step: (time.sleep(0.01), read(step))[1])
    open_page(page, url, temperature=0, **{"max-tokens": 120})
    page.type("#input", "Hello")
    page.keyboard.press("Shift+Enter")  # a new line, not a send
    page.keyboard.type("there")
    assert page.input_value("#input") == "Hello\nthere"
    assert page.locator(".msg").count() == 0
    # Record the reply's length at every change of the page: it must grow in steps.
    page.evaluate("""window.lengths = [];
        new MutationObserver(() => {
          const r = document.querySelector('.msg.assistant .body');
          if (r) window.lengths.push(r.textContent.length);
        }).observe(document.getElementById('log'), {childList: true, subtree: true});""")
    page.keyboard.press("Enter")
    wait_reply(page, 1)
    assert page.input_value("#input") == ""
    assert page.locator(".msg.user .body").inner_text() == "Hello\nthere"
    lengths = sorted({n for n in page.evaluate("window.lengths") if n > 1})
    assert len(lengths) >= 3, lengths
    stats = page.locator(".stats").inner_text()
    assert re.fullmatch(r"120 tokens · [\d.]+ tok/s · cut at max tokens", stats)
    # What the page put together from the stream is the server's greedy reply.
    body = {"model": "m", "messages": [{"role": "user", "content": "Hello\nthere"}],
            "temperature": 0, "max_tokens": 120}  # fmt: skip
    expected = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    assert stored(page)["messages"][1]["content"] == expected["choices"][0]["message"]["content"]


def test_stop_ends_a_long_reply_and_the_server_frees_its_place(page, server):
    url, engine = server
    open_page(page, url, temperature=0, **{"max-tokens": ""})  # the rest of the context
    send(page, "Tell me everything")
    page.wait_for_function("document.querySelector('.msg.assistant .body').textContent.length > 20")
    assert running_count(url) == 1
    page.click("#stop")
    wait_reply(page, 1)
    assert page.locator(".msg.assistant .stats").inner_text().endswith(" · stopped")
    partial = stored(page)["messages"][1]["content"]
    assert 20 < len(partial)
    deadline = time.monotonic() + 10
    while engine.load["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running_count(url) == 0
    # The server still serves, and the stopped reply is part of the next turn.
    page.click("summary")
    page.fill("#max-tokens", "8")
    send(page, "Shorter, please")
    wait_reply(page, 2)
    messages = stored(page)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == partial and messages[3]["content"]
    assert page.locator(".stats").nth(1).inner_text().startswith("8 tokens")


def test_the_conversation_survives_a_reload_and_new_chat_starts_clean(page, server):
    url, _ = server
    open_page(page, url, temperature=0, **{"max-tokens": 10}, system="Be brief.")
    send(page, "First question")
    wait_reply(page, 1)
    before = page.locator("#log").inner_text()
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.locator("#log").inner_text() == before
    assert page.input_value("#system") == "Be brief." and page.input_value("#max-tokens") == "10"
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and stored(page)["messages"] == []
    page.reload()
    page.wait_for_selector(".empty")
    assert page.locator(".msg").count() == 0
    assert page.input_value("#system") == "Be brief."  # settings outlive a chat


MARKUP = """Careful: <script>window.pwned = 1</script> and <img src=x onerror="window.pwned = 2">
and [a link](javascript:window.pwned=3) but [docs](https://example.org/docs), **bold**, *it*.

- one `<b>inline</b>`
- two

```python
print("<script>alert(1)</script>")
```
"""


def test_markup_in_a_reply_shows_as_text_and_runs_nothing(page, server):
    url, _ = server
    response = page.goto(url + "/")
    assert "script-src 'self';" in response.headers["content-security-policy"]
    conversation = {"messages": [{"role": "user", "content": "<i>hi</i>"},
                                 {"role": "assistant", "content": MARKUP}]}  # fmt: skip
    page.evaluate("([k, v]) => localStorage.setItem(k, v)", [KEY, json.dumps(conversation)])
    page.reload()
    reply = page.locator(".msg.assistant .body")
    reply.wait_for()
    text = reply.inner_text()
    assert '<script>window.pwned = 1</script> and <img src=x onerror="window.pwned = 2">' in text
    assert "[a link](javascript:window.pwned=3)" in text
    assert page.locator(".msg.user .body").inner_text() == "<i>hi</i>"
    log = page.locator("#log")
    assert log.locator("script, img, i, b, iframe").count() == 0
    assert log.locator("a").evaluate_all("as => as.map(a => a.href)") == [
        "https://example.org/docs"
    ]
    assert reply.locator("strong").inner_text() == "bold"
    assert reply.locator("em").inner_text() == "it"
    assert reply.locator("li code").inner_text() == "<b>inline</b>"
    code = reply.locator("pre code")
    assert code.inner_text() == 'print("<script>alert(1)</script>")'
    assert code.get_attribute("class") == "language-python"
    assert page.evaluate("window.pwned") is None


def test_a_phone_width_window_keeps_everything_on_screen(page, server):
    url, _ = server
    page.set_viewport_size({"width": 360, "height": 740})
    long_code = "```\n" + "x = " + "1 + " * 200 + "1\n```\n" + "word " * 300
    page.goto(url + "/")
    conversation = {"messages": [{"role": "user", "content": "y" * 500},
                                 {"role": "assistant", "content": long_code}]}  # fmt: skip
    page.evaluate("([k, v]) => localStorage.setItem(k, v)", [KEY, json.dumps(conversation)])
    page.reload()
    page.wait_for_selector("pre")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    for selector in ("#input", "#send", "#new-chat", "summary"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 360, selector
    # Keyboard only: Tab from the message box reaches Send.
    page.focus("#input")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "send"


def test_a_server_with_an_api_key_serves_the_page_and_takes_the_key(browser, tiny_folder):
    with running(str(tiny_folder), api_key="s3cret") as (url, _):
        assert httpx.get(url + "/").status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 401
        context = browser.new_context(bypass_csp=True)
        page = context.new_page()
        errors = []
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("#notice:has-text('API key')")
        assert page.locator("#settings").get_attribute("open") is not None
        page.fill("#api-key", "s3cret")
        page.press("#api-key", "Enter")  # a change event
        page.locator("#api-key").blur()
        page.wait_for_function("document.getElementById('model').textContent !== ''")
        page.fill("#max-tokens", "5")
        send(page, "Hello")
        wait_reply(page, 1)
        assert stored(page)["messages"][1]["content"]
        assert page.locator("#notice").is_hidden()
        context.close()
    assert [e for e in errors if "401" not in e] == []
