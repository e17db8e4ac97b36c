"""Talking to a live system: poll a predicate until it holds or a deadline passes; one JSON HTTP call."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.5) -> Any:
    """The first truthy value of ``predicate()``; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def call_json(
    url: str, method: str = "GET", body=None, raw: bytes | None = None, token: str | None = None, timeout: float = 60
) -> tuple[int, dict]:
    """(status, JSON answer) of one HTTP call (``body``: JSON, or ``raw`` bytes as they are; ``token``: a
    bearer token). An HTTP error answers with its status and JSON body, never raises."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def scrape_health(prometheus_url: str) -> str:
    """One line per target of a Prometheus: health, last scrape's duration and error (for a failure's message)."""
    try:
        _, body = call_json(prometheus_url + "/api/v1/targets", timeout=10)
        targets = body["data"]["activeTargets"]
    except (OSError, KeyError, ValueError) as e:
        return f"prometheus targets unreadable: {e}"
    return "\n".join(
        f"{t['scrapeUrl']}: {t['health']}, last scrape {t.get('lastScrapeDuration', 0):.2f} s, error {t['lastError']!r}"
        for t in targets
    )
