"""Retake docs/images/chat.png: the chat page over the demo model, a short conversation.

python docs/images/chat_png.py  # needs the dev extra (playwright) and /usr/bin/chromium
"""

import threading
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from mlx_openelm.serve import make_server

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["Who is Mr. Darcy?", "And what does Elizabeth think of him?"]


def main() -> None:
    server, engine = make_server(str(ROOT / "demo/OpenELM-austen"), port=8765,
                                 chat_template="openelm", log_level="warning")  # fmt: skip
    engine.start()
    threading.Thread(target=server.run, daemon=True).start()
    while not (server.started and engine.ready.is_set()):
        time.sleep(0.1)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 720})
        page.goto("http://127.0.0.1:8765/")
        page.click("summary")
        page.fill(
            "#system", "You are a well-read companion who answers in the manner of Jane Austen."
        )
        page.fill("#temperature", "0.7")
        page.fill("#max-tokens", "60")
        page.evaluate("document.getElementById('settings').open = false")
        for n, question in enumerate(QUESTIONS, 1):
            page.fill("#input", question)
            page.press("#input", "Enter")
            page.wait_for_selector(f".msg.assistant:nth-of-type({2 * n}) .stats")
        page.screenshot(path=str(ROOT / "docs/images/chat.png"))
        browser.close()
    server.should_exit = True
    engine.stop()


if __name__ == "__main__":
    main()
