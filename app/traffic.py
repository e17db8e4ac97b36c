"""Simulated users for a running service: real HTTP requests, feedback drawn from a synthetic ground truth.

A synthetic dataset (:func:`mtrec.data.synthetic.generate`) knows, for every (user, item, context) row,
the true probability of each task. :class:`SimulatedUsers` turns a user's rows into requests to
``POST /v1/recommend`` (the rows' items are the candidates), and answers each item it is shown with
events drawn along the task funnel from the TRUE probabilities (a click with p(click), a cart given the
click with p(cart | click), ...), sent to ``POST /v1/feedback``. The service's controller sees that
feedback through its metrics, as it would from real users. Used by the demo, the serving benchmark
and the soak test; traffic goes only to the URL given (127.0.0.1 in every test).

Since the users know the true probabilities, they can also tell what a weight vector is worth
exactly: :meth:`SimulatedUsers.score` asks the service for its predictions of every candidate of
the requests sent, and :meth:`SimulatedUsers.expected_rates` ranks them as serving does
(:func:`mtrec.fusion.rank`) under any weights and averages the true probabilities of what it would show.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mtrec.data.contract import INTERACTIONS, read_tasks
from mtrec.fusion import rank
from mtrec.fusion.simulator import conditional, load_pool


@dataclass
class TrafficReport:
    """What a traffic run saw: requests sent and failed, latency, impressions and events per task, and
    the same per group of users (``groups``: group -> ``{"impressions": n, "events": {task: n}}``) when
    the users were told how to group themselves (:class:`SimulatedUsers` ``group``)."""

    requests: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # "status 503" / exception name -> count
    latencies_ms: list[float] = field(default_factory=list)
    impressions: int = 0
    events: dict[str, int] = field(default_factory=dict)
    feedback_failed: int = 0
    seconds: float = 0.0
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def merge(cls, reports: list[TrafficReport]) -> TrafficReport:
        """One report for several runs (rounds of traffic): counts added, latencies pooled."""

        def added(counts: list[dict[str, int]]) -> dict[str, int]:
            out: dict[str, int] = {}
            for c in counts:
                for k, n in c.items():
                    out[k] = out.get(k, 0) + n
            return out

        names = sorted({g for r in reports for g in r.groups})
        groups = {
            g: {
                "impressions": sum(r.groups[g]["impressions"] for r in reports if g in r.groups),
                "events": added([r.groups[g]["events"] for r in reports if g in r.groups]),
            }
            for g in names
        }

        return cls(
            requests=sum(r.requests for r in reports),
            failed=sum(r.failed for r in reports),
            errors=added([r.errors for r in reports]),
            latencies_ms=[v for r in reports for v in r.latencies_ms],
            impressions=sum(r.impressions for r in reports),
            events=added([r.events for r in reports]),
            feedback_failed=sum(r.feedback_failed for r in reports),
            seconds=sum(r.seconds for r in reports),
            groups=groups,
        )

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
        return {
            "requests": self.requests,
            "failed": self.failed,
            "errors": dict(self.errors),
            "feedback_failed": self.feedback_failed,
            "p50_ms": statistics.median(lat) if lat else float("nan"),
            "p99_ms": pct(0.99),
            "requests_per_s": self.requests / self.seconds if self.seconds else float("nan"),
            "impressions": self.impressions,
            "events": dict(self.events),
            "rates": {t: n / max(1, self.impressions) for t, n in self.events.items()},
            "groups": {
                g: {"impressions": c["impressions"], "events": dict(c["events"])} for g, c in self.groups.items()
            },
        }


class SimulatedUsers:
    """Users of a synthetic dataset sending requests and feedback to a service at ``url``.

    ``tasks``: the binary funnel tasks whose events are drawn (default: every binary task whose parent
    is among them). ``candidates`` items per request, ``k`` shown. ``group``: user id -> the name of
    the user's group (the demo's: the holdout or the adaptive traffic); each impression and its events
    are also counted under it (:attr:`TrafficReport.groups`).
    """

    def __init__(
        self,
        data_dir: str | Path,
        url: str,
        tasks: list[str] | None = None,
        candidates: int = 20,
        k: int = 5,
        seed: int = 0,
        timeout_s: float = 10.0,
        token: str | None = None,
        group: Callable[[Any], str] | None = None,
    ) -> None:
        root = Path(data_dir)
        specs = read_tasks(root)
        if tasks is None:
            binary = {t.name for t in specs if t.kind == "binary"}
            tasks = [t.name for t in specs if t.name in binary and (t.depends_on is None or t.depends_on in binary)]
        self._pool = load_pool(root, tasks, candidates=candidates, seed=seed)
        table = pq.read_table(root / INTERACTIONS, columns=["user_id", "item_id"])
        self._users = table.column("user_id").to_numpy(zero_copy_only=False)
        self._items = table.column("item_id").to_numpy(zero_copy_only=False)
        self._cond = conditional(self._pool.truth, self._pool.parents)  # (N, T) p(task | parent)
        self._url = url.rstrip("/")
        self._k = k
        self._timeout = timeout_s
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._rng = np.random.default_rng([seed, 7])
        self._lock = threading.Lock()
        self._group = group

    @property
    def tasks(self) -> list[str]:
        return list(self._pool.tasks)

    def rows(self, q: int) -> dict[Any, int]:
        """Request ``q``'s candidates: item id -> its pool row (a user meets an item more than once in
        the data; a request names each item once, with its first row)."""
        out: dict[Any, int] = {}
        for r in self._pool.requests[q % len(self._pool.requests)]:
            out.setdefault(_plain(self._items[r]), int(r))
        return out

    def request_body(self, q: int) -> dict[str, Any]:
        """The body of request ``q`` (a row of the pool's requests)."""
        rows = self.rows(q)
        return {"user_id": _plain(self._users[next(iter(rows.values()))]), "candidates": list(rows), "k": self._k}

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST JSON; (status, parsed body). HTTP errors are returned, not raised."""
        req = urllib.request.Request(self._url + path, json.dumps(body).encode(), self._headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read() or b"{}")
            except ValueError:
                detail = {}
            return e.code, detail

    def one(self, q: int, report: TrafficReport) -> None:
        """Request ``q``, then feedback for every item shown."""
        row_of = self.rows(q)
        request = self.request_body(q)
        group = None if self._group is None else self._group(request["user_id"])
        start = time.perf_counter()
        try:
            status, body = self.post("/v1/recommend", request)
        except (OSError, ValueError) as e:
            status, body = -1, {"error": type(e).__name__}
        ms = (time.perf_counter() - start) * 1000
        with self._lock:
            report.requests += 1
            if status != 200:
                report.failed += 1
                key = f"status {status}" if status > 0 else body["error"]
                report.errors[key] = report.errors.get(key, 0) + 1
                return
            report.latencies_ms.append(ms)
        for shown in body["items"]:
            events = self._draw(row_of[shown["item_id"]])
            with self._lock:
                report.impressions += 1
                for t, v in events.items():
                    report.events[t] = report.events.get(t, 0) + int(v)
                if group is not None:
                    tally = report.groups.setdefault(group, {"impressions": 0, "events": {}})
                    tally["impressions"] += 1
                    for t, v in events.items():
                        tally["events"][t] = tally["events"].get(t, 0) + int(v)
            if any(events.values()):
                feedback = {"request_id": body["request_id"], "item_id": shown["item_id"], "events": events}
                try:
                    status, _ = self.post("/v1/feedback", feedback)
                except (OSError, ValueError):  # a timeout or dropped connection: counted, never raised
                    status = -1
                if status != 200:
                    with self._lock:
                        report.feedback_failed += 1

    def run(
        self,
        num_requests: int,
        concurrency: int = 4,
        start: int = 0,
        progress: Callable[[TrafficReport], None] | None = None,
    ) -> TrafficReport:
        """Send ``num_requests`` requests (pool rows ``start``...) from ``concurrency`` threads."""
        report = TrafficReport()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            for i, fut in enumerate([pool.submit(self.one, start + q, report) for q in range(num_requests)]):
                fut.result()
                if progress is not None and (i + 1) % max(1, num_requests // 10) == 0:
                    progress(report)
        report.seconds = time.perf_counter() - t0
        return report

    def score(self, queries: range, concurrency: int = 4) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """The service's predictions of every candidate of requests ``queries`` (``POST /v1/score``, which
        counts no impression): per request, its candidates' pool rows ``(K,) int64`` and the predictions
        ``{task: (K,) float64}`` in the same order. RuntimeError naming the request and status when the
        service does not answer one."""

        def one(q: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            body = self.request_body(q)
            body.pop("k")  # /v1/score answers every candidate, in order
            status, out = self.post("/v1/score", body)
            if status != 200:
                raise RuntimeError(f"POST /v1/score of request {q} answered {status}: {out}")
            row_of = self.rows(q)
            rows = np.array([row_of[it["item_id"]] for it in out["items"]], np.int64)
            tasks = out["items"][0]["predictions"]
            return rows, {t: np.array([it["predictions"][t] for it in out["items"]]) for t in tasks}

        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, queries))

    def expected_rates(
        self,
        scored: list[tuple[np.ndarray, dict[str, np.ndarray]]],
        weights: dict[str, float],
        scales: dict[str, float],
    ) -> dict[str, float]:
        """The exact expected events per impression of each task (true probabilities, no sampling) if the
        requests of ``scored`` (:meth:`score`) were served under ``weights``: each ranked as serving ranks
        (:func:`mtrec.fusion.rank` with the bundle's fusion ``scales``), its top ``k`` shown."""
        shown = [rows[rank(preds, weights, self._k, scales)[0]] for rows, preds in scored]
        truth = self._pool.truth[np.concatenate(shown)]  # (impressions, T)
        return {t: float(x) for t, x in zip(self._pool.tasks, truth.mean(axis=0))}

    def _draw(self, row: int) -> dict[str, int]:
        """Funnel events of one shown item: each task fires with p(task | parent) once its parent fired."""
        with self._lock:
            u = self._rng.random(len(self._pool.tasks))
        fired: list[bool] = []
        for t, parent in enumerate(self._pool.parents):
            fired.append((parent < 0 or fired[parent]) and bool(u[t] < self._cond[row, t]))
        return {name: int(f) for name, f in zip(self._pool.tasks, fired)}


def _plain(x: Any) -> Any:
    """A numpy scalar as a JSON-friendly Python value."""
    return x.item() if hasattr(x, "item") else x
