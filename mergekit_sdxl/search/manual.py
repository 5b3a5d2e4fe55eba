"""The `manual` scorer: a page on this machine (127.0.0.1 only) shows each trial's images and takes a person's
1-10 rating, or an A/B choice between the trial and the best one so far.

A/B answers are pairwise comparisons; a trial's value is its Bradley-Terry log-strength fitted on every comparison
so far (Hunter's MM algorithm, with one virtual win and loss against a reference of strength 1 so an unbeaten trial
stays finite). The first trial has nothing to be compared with and scores 0, the reference. Answers are kept in
`manual.json` in the output folder, so a continued study keeps them. The page carries a random token: other sites
open in the browser cannot post answers.
"""

from __future__ import annotations

import http.server
import json
import math
import queue
import secrets
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mergekit_sdxl.errors import UsageError
from mergekit_sdxl.search.files import atomic_write

MODES = ("rating", "ab")
PAGE = Path(__file__).with_name("manual.html")


def bradley_terry(comparisons: Sequence[tuple[int, int]], iterations: int = 500) -> dict[int, float]:
    """Log-strengths from (winner, loser) pairs, each player regularised by one win and one loss against a
    reference player of strength 1 (log 0)."""
    players = sorted({p for pair in comparisons for p in pair})
    strength = dict.fromkeys(players, 1.0)
    for _ in range(iterations):
        new = {}
        for p in players:
            wins = 1.0 + sum(1 for w, _ in comparisons if w == p)
            denominator = 2.0 / (strength[p] + 1.0)  # the virtual win and loss against the reference
            for w, loser in comparisons:
                if p in (w, loser):
                    other = loser if w == p else w
                    denominator += 1.0 / (strength[p] + strength[other])
            new[p] = wins / denominator
        change = max(abs(math.log(new[p] / strength[p])) for p in players) if players else 0.0
        strength = new
        if change < 1e-12:
            break
    return {p: math.log(s) for p, s in strength.items()}


class ManualScorer:
    """Serves the rating page and blocks each trial until the person answers."""

    def __init__(self, out_dir: Path, mode: str = "rating", port: int = 0,
                 notify: Callable[[str], None] = print) -> None:
        if mode not in MODES:
            raise UsageError(f"--manual-mode {mode!r}: choose {', '.join(MODES)}")
        self.out_dir, self.mode, self.token = out_dir, mode, secrets.token_urlsafe(16)
        self.state_file = out_dir / "manual.json"
        self.memory: dict[str, Any] = self._load()
        self.current: dict[str, Any] | None = None
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lock = threading.Lock()
        try:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        except OSError as exc:
            raise UsageError(f"--manual-port {port}: cannot listen on 127.0.0.1 ({exc.strerror or exc})") from exc
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/?token={self.token}"
        threading.Thread(target=self.server.serve_forever, name="manual-scorer", daemon=True).start()
        notify(f"manual scoring: open {self.url} in a browser on this machine")

    def __call__(self, number: int, images: Sequence[Path], values: Mapping[str, Any]) -> float:
        rel = [str(Path(p).relative_to(self.out_dir)) for p in images]
        incumbent = self._incumbent() if self.mode == "ab" else None
        if self.mode == "ab" and incumbent is None:
            self._remember(number, rel, None)
            return 0.0
        with self.lock:
            self.current = {"trial": number, "mode": self.mode, "images": rel, "values": dict(values),
                            "incumbent": incumbent}
        try:
            answer = self._wait(number)
        finally:
            with self.lock:
                self.current = None
        if self.mode == "rating":
            self._remember(number, rel, float(answer["rating"]))
            return float(answer["rating"])
        assert incumbent is not None  # "ab" mode: the first trial, with no incumbent, returned above
        winner, loser = (number, incumbent["trial"]) if answer["choice"] == "B" else (incumbent["trial"], number)
        self.memory["comparisons"].append([winner, loser])
        self._remember(number, rel, None)
        return bradley_terry([tuple(c) for c in self.memory["comparisons"]])[number]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, data: Mapping[str, Any]) -> str | None:
        """Check and queue an answer from the page; returns an error text or None."""
        with self.lock:
            current = self.current
        if current is None or data.get("trial") != current["trial"]:
            return "not the trial being scored"
        if self.mode == "rating":
            rating = data.get("rating")
            if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 10:
                return "rating must be a whole number from 1 to 10"
        elif data.get("choice") not in ("A", "B"):
            return "choice must be A or B"
        self.answers.put(dict(data))
        return None

    def state(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.current) if self.current else {"waiting": True, "mode": self.mode}

    def _wait(self, number: int) -> dict[str, Any]:
        while True:
            try:
                answer = self.answers.get(timeout=0.2)  # short waits keep Ctrl-C responsive
            except queue.Empty:
                continue
            if answer.get("trial") == number:
                return answer

    def _incumbent(self) -> dict[str, Any] | None:
        trials = self.memory["trials"]
        if not trials:
            return None
        strengths = bradley_terry([tuple(c) for c in self.memory["comparisons"]])
        best = max(trials, key=lambda n: (strengths.get(int(n), 0.0), -int(n)))
        return {"trial": int(best), "images": trials[best]["images"]}

    def _remember(self, number: int, images: list[str], rating: float | None) -> None:
        self.memory["trials"][str(number)] = {"images": images, "rating": rating}
        atomic_write(self.state_file, json.dumps(self.memory, indent=1))

    def _load(self) -> dict[str, Any]:
        if self.state_file.exists():
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
            if data.get("mode") != self.mode:
                raise UsageError(f"{self.state_file}: answers were given in {data.get('mode')!r} mode; continue "
                                 f"with --manual-mode {data.get('mode')} or use another --out folder")
            return data
        return {"mode": self.mode, "comparisons": [], "trials": {}}


def _handler(scorer: ManualScorer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # the terminal shows the study's progress, not requests
            pass

        def _authorised(self) -> tuple[str, bool]:
            url = urllib.parse.urlsplit(self.path)
            token = urllib.parse.parse_qs(url.query).get("token", [""])[0]
            return url.path, secrets.compare_digest(token, scorer.token)

        def _send(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path, ok = self._authorised()
            if not ok:
                return self._send(403, b"forbidden: open the address printed by mergekit-sdxl", "text/plain")
            if path == "/":
                return self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            if path == "/state":
                return self._send(200, json.dumps(scorer.state()).encode(), "application/json")
            if path.startswith("/img/"):
                return self._image(urllib.parse.unquote(path.removeprefix("/img/")))
            return self._send(404, b"not found", "text/plain")

        def _image(self, rel: str) -> None:
            target = (scorer.out_dir / rel).resolve()
            root = (scorer.out_dir / "trials").resolve()
            if root not in target.parents or target.suffix != ".png" or not target.is_file():
                return self._send(404, b"not found", "text/plain")
            return self._send(200, target.read_bytes(), "image/png")

        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            path, ok = self._authorised()
            if not ok or path != "/answer":
                return self._send(403, b"forbidden", "text/plain")
            length = min(int(self.headers.get("Content-Length") or 0), 4096)
            try:
                data = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError:
                return self._send(400, b"not JSON", "text/plain")
            error = scorer.answer(data) if isinstance(data, dict) else "expected a JSON object"
            return self._send(400 if error else 200, (error or "ok").encode(), "text/plain")

    return Handler
