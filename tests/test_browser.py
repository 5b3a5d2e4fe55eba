"""The headless-Chromium helper other page tests use: load a page, run JavaScript, click, take a screenshot."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

PAGE = """<!doctype html><html><body><img id="pic" src="dot.png">
<button id="go" onclick="document.getElementById('out').textContent = 'clicked ' + (++window.n)">go</button>
<p id="out">waiting</p><script>window.n = 0;</script></body></html>"""


def test_page_loads_runs_js_clicks_and_screenshots(tmp_path: Path, chromium) -> None:
    from PIL import Image

    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(PAGE)
    Image.new("RGB", (7, 5), "red").save(site / "dot.png")
    handler = functools.partial(_Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = chromium.open(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        page.wait_for("document.getElementById('pic').complete")
        assert page.evaluate("document.getElementById('pic').naturalWidth") == 7
        assert page.evaluate("document.getElementById('out').textContent") == "waiting"
        page.evaluate("document.getElementById('go').click()")
        page.evaluate("document.getElementById('go').click()")
        assert page.evaluate("document.getElementById('out').textContent") == "clicked 2"
        shot = page.screenshot(tmp_path / "shot.png")
        assert Image.open(shot).size[0] > 100
    finally:
        server.shutdown()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass
