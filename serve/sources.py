"""Where the weight controller reads its feedback: per-arm windows of impressions and events.

A policy adds each :class:`~mtrec.fusion.Observation` to its tallies once, so successive windows must
not overlap (see :mod:`mtrec.fusion.control`). A PromQL ``increase(x[W])`` evaluated every period
would overlap whenever ``W`` exceeds the period, and leave gaps or double counts whenever the
controller's steps drift from a period of exactly ``W``; it also extrapolates to the window's edges
and misses the first increments of a series Ray creates on its first event. So both sources here
read the *cumulative* counters and difference them between reads (:class:`CounterDeltas`): a window
is exactly "what happened since the last read", whatever the time between reads, nothing is counted
twice, and what a scrape delays is counted in the next window rather than lost.

Each counter series (one per replica, arm and task) is differenced on its own, so a restarted
replica (its counter back to 0: a reset) adds its new count instead of a negative delta, and a
series that vanishes for a while (a failed scrape) is remembered and differenced when it returns.
The first good read that finds any series only records the baseline (``read`` returns None until then). A source never raises: a timeout, a refused connection,
an HTTP error or an answer that is not a well-formed set of finite, non-negative counts gives a
*stale* observation (the policy then holds its last good weights), and ``problem`` says why.

- :class:`PrometheusSource` asks a Prometheus server (``/api/v1/query``) for
  ``last_over_time(ray_..._total{application="APP"}[W])``: the latest value of every series seen in
  the last ``window_s`` seconds, which bridges a few failed scrapes.
- :class:`ScrapeSource` reads a Ray metrics endpoint's exposition text directly (the embedded
  default, without a Prometheus server).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from mtrec.errors import ConfigError
from mtrec.fusion import ArmCounts, Observation
from mtrec_serve.metrics import exported_name

logger = logging.getLogger("mtrec_serve.sources")

IMPRESSIONS = exported_name("mtrec_impressions")  # ray_mtrec_impressions_total
EVENTS = exported_name("mtrec_feedback_events")  # ray_mtrec_feedback_events_total
# Labels that identify one counter series of ours (Ray also adds SessionName, NodeAddress, Version, ...).
Series = tuple[str, tuple[tuple[str, str], ...]]  # (metric name, sorted labels)
Sample = tuple[Series, float]


class SourceError(Exception):
    """A read that produced no usable numbers (the message says why)."""


class CounterDeltas:
    """Differences of cumulative counter series between successive reads, with counter resets handled."""

    def __init__(self) -> None:
        self._last: dict[Series, float] = {}
        self._primed = False

    @property
    def primed(self) -> bool:
        """Whether a baseline has been read (deltas are meaningful from the next read)."""
        return self._primed

    def update(self, samples: Iterable[Sample]) -> dict[Series, float]:
        """The increase of each series since the last read: ``value - last``, or ``value`` when it
        fell (the counter restarted) or the series is new since the baseline; ``{}`` until the baseline.

        The baseline is the first read with at least one series: an empty answer may only mean that
        Prometheus has not scraped yet, and taking it as the baseline would count every series' whole
        history as new the moment it appears."""
        samples = list(samples)
        deltas: dict[Series, float] = {}
        for series, value in samples:
            last = self._last.get(series)
            if self._primed:
                deltas[series] = value if last is None or value < last else value - last
            self._last[series] = value
        self._primed = self._primed or bool(samples)
        return deltas


def observation(deltas: dict[Series, float], timestamp: float) -> Observation:
    """Per-arm counts from per-series deltas: impressions summed by ``arm``, events by ``(arm, task)``."""
    impressions: dict[str, float] = {}
    events: dict[str, dict[str, float]] = {}
    for (name, labels), delta in deltas.items():
        lab = dict(labels)
        arm = lab.get("arm")
        if arm is None:
            continue
        if name == IMPRESSIONS:
            impressions[arm] = impressions.get(arm, 0.0) + delta
        elif name == EVENTS and "task" in lab:
            per_task = events.setdefault(arm, {})
            per_task[lab["task"]] = per_task.get(lab["task"], 0.0) + delta
    arms = {a: ArmCounts(impressions.get(a, 0.0), events.get(a, {})) for a in set(impressions) | set(events)}
    return Observation(timestamp, arms)


def complete(obs: Observation, arms: Iterable[str], tasks: Iterable[str]) -> Observation:
    """``obs`` with zero counts for the arms and tasks that had no events in the window (a counter
    Ray has not yet exported is a counter still at 0)."""
    tasks = list(tasks)
    full = {}
    for arm in set(obs.arms) | set(arms):
        counts = obs.arms.get(arm, ArmCounts(0.0, {}))
        full[arm] = ArmCounts(counts.impressions, {t: counts.events.get(t, 0.0) for t in tasks} | counts.events)
    return Observation(obs.timestamp, full, obs.stale)


class _CounterSource:
    """Shared by both sources: read samples, difference them, turn failures into stale observations."""

    def __init__(self, what: str, clock: Callable[[], float] = time.time) -> None:
        self._what = what
        self._clock = clock
        self._deltas = CounterDeltas()
        self.problem: str | None = None  # why the last read was stale (None: it was good)

    def read(self) -> Observation | None:
        """The counts since the last read; a stale observation when the read failed (``problem`` says
        why); None until a read finds the series that set the baseline."""
        now = self._clock()
        primed = self._deltas.primed
        try:
            samples = self._samples()
            if not samples and primed:
                raise SourceError("no mtrec counter series in the answer (they were there before)")
        except SourceError as e:
            return self._stale(now, str(e))
        deltas = self._deltas.update(samples)
        self.problem = None
        if not primed:
            if samples:
                logger.info("metrics source %s: baseline of %d counter series recorded", self._what, len(samples))
            else:
                self.problem = "no mtrec counter series yet (no traffic, or not scraped yet): no baseline"
            return None
        return observation(deltas, now)

    def _stale(self, now: float, problem: str) -> Observation:
        self.problem = f"{self._what}: {problem}"
        logger.warning("metrics source %s", self.problem)
        return Observation(now, {}, stale=True)

    def _samples(self) -> list[Sample]:
        raise NotImplementedError


def _get(url: str, timeout_s: float) -> bytes:
    """The body of a GET, or SourceError naming the URL and what went wrong."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise SourceError(f"GET {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, timed out, cut off
        reason = getattr(e, "reason", e)
        raise SourceError(f"GET {url}: {type(reason).__name__}: {reason}") from None


def _count(value: Any, where: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise SourceError(f"{where}: value {value!r} is not a number") from None
    if not math.isfinite(x) or x < 0:
        raise SourceError(f"{where}: value {value!r} is not a finite count >= 0")
    return x


def _series(name: str, labels: dict[str, str]) -> Series:
    return name, tuple(sorted((k, v) for k, v in labels.items() if k != "__name__"))


class PrometheusSource(_CounterSource):
    """Counts from a Prometheus server's HTTP API (see the module docstring).

    ``url``: the server, e.g. ``http://127.0.0.1:9090``; ``app``: the Serve application whose series
    count (None: all); ``window_s``: how far back a series' latest sample may lie and still count;
    ``timeout_s``: per HTTP request.
    """

    def __init__(
        self,
        url: str,
        app: str | None = None,
        window_s: float = 60.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(f"prometheus {url}", clock)
        if not (math.isfinite(window_s) and window_s >= 1):
            raise ConfigError(f"PrometheusSource: window_s={window_s!r} must be at least 1 s")
        self._url = url.rstrip("/")
        self._app = app
        self._window_s = int(math.ceil(window_s))
        self._timeout_s = timeout_s

    def queries(self) -> list[str]:
        """The PromQL queries read each step (one per counter)."""
        app = None if self._app is None else self._app.replace("\\", "\\\\").replace('"', '\\"')
        selector = "" if app is None else f'{{application="{app}"}}'
        return [f"last_over_time({name}{selector}[{self._window_s}s])" for name in (IMPRESSIONS, EVENTS)]

    def _samples(self) -> list[Sample]:
        samples: list[Sample] = []
        for query, name in zip(self.queries(), (IMPRESSIONS, EVENTS)):
            url = f"{self._url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
            body = _get(url, self._timeout_s)
            try:
                doc = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise SourceError(f"{url}: answer is not JSON: {body[:80]!r}") from None
            if not isinstance(doc, dict) or doc.get("status") != "success":
                error = doc.get("error") if isinstance(doc, dict) else None
                raise SourceError(f"{url}: status {doc.get('status') if isinstance(doc, dict) else doc!r}: {error}")
            data = doc.get("data")
            if (
                not isinstance(data, dict)
                or data.get("resultType") != "vector"
                or not isinstance(data.get("result"), list)
            ):
                raise SourceError(f"{url}: expected data.resultType 'vector' with a result list, got {data!r:.120}")
            for item in data["result"]:
                try:
                    labels, (_, value) = item["metric"], item["value"]
                except (KeyError, TypeError, ValueError):
                    raise SourceError(f"{url}: malformed result item {item!r:.120}") from None
                samples.append((_series(name, labels), _count(value, f"{url}: {name}{labels}")))
        return samples


class ScrapeSource(_CounterSource):
    """Counts read straight from a Ray metrics endpoint (``http://HOST:PORT/metrics``), no Prometheus.

    One endpoint is one node: this is the embedded single-node default. ``app`` filters by the
    ``application`` label (None: all).
    """

    def __init__(
        self, url: str, app: str | None = None, timeout_s: float = 5.0, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(f"scrape {url}", clock)
        self._url = url
        self._app = app
        self._timeout_s = timeout_s

    def _samples(self) -> list[Sample]:
        from prometheus_client.parser import text_string_to_metric_families

        body = _get(self._url, self._timeout_s)
        samples: list[Sample] = []
        try:
            for family in text_string_to_metric_families(body.decode("utf-8")):
                for s in family.samples:
                    if s.name in (IMPRESSIONS, EVENTS) and (
                        self._app is None or s.labels.get("application") == self._app
                    ):
                        samples.append((_series(s.name, s.labels), _count(s.value, f"{self._url}: {s.name}{s.labels}")))
        except (ValueError, TypeError, IndexError, UnicodeDecodeError) as e:
            raise SourceError(f"{self._url}: not Prometheus exposition text: {e}") from None
        return samples


def build_source(spec: dict[str, Any] | None, app: str | None, window_s: float) -> _CounterSource | None:
    """The source a controller's ``source`` argument describes (ConfigError when it is malformed): ``{"kind": "prometheus", "url", "app"?,
    "timeout_s"?}``, ``{"kind": "scrape", "url", "app"?, "timeout_s"?}`` or None (no feedback)."""
    if spec is None:
        return None
    spec = dict(spec)
    kind = spec.pop("kind", None)
    url = spec.pop("url", None)
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"metrics source {kind!r}: url={url!r} must be an http(s) URL")
    app = spec.pop("app", app)
    timeout_s = float(spec.pop("timeout_s", 5.0))
    if spec:
        raise ConfigError(f"metrics source {kind!r}: unknown key(s) {sorted(spec)}; valid: kind, url, app, timeout_s")
    if kind == "prometheus":
        return PrometheusSource(url, app, window_s, timeout_s)
    if kind == "scrape":
        return ScrapeSource(url, app, timeout_s)
    raise ConfigError(f"metrics source kind {kind!r} is not one of: prometheus, scrape")
