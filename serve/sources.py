"""Where the weight controller reads its feedback: per-arm windows of impressions, events and predicted events.

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
The first good read that finds any series only records the baseline (``read`` returns None until
then). A source never raises: a timeout, a refused connection, an HTTP error, an answer that is not a
well-formed set of finite, non-negative counts, or samples that are all too old give a *stale*
observation (the policy then holds its last good weights); ``problem`` says why and ``reason`` names
the kind (:data:`mtrec_serve.metrics.REJECT_REASONS`).

Scope: only the series of one serving deployment count: those whose
:data:`~mtrec_serve.metrics.DEPLOYMENT_LABEL` is the controller's deployment id, so deployments that
share a Prometheus never count each other's traffic.

Freshness: every sample keeps its time. A sample older than twice the scrape interval is stale: its
series is held (left out of this read, differenced when it is fresh again) rather than read as a
window without events, and a read whose samples are all stale is a stale observation (a dead target
whose last values Prometheus still returns does not look like quiet traffic). ``newest_sample_at`` is
the time of the newest sample seen: the controller's staleness gauge is its age.

- :class:`PrometheusSource` asks a Prometheus server (``/api/v1/query``) for the raw samples of the
  last ``window_s`` seconds, ``ray_..._total{deployment_id="ID"}[W]``, and takes each series' latest
  sample with its timestamp;
- :class:`ScrapeSource` reads a Ray metrics endpoint's exposition text directly (the embedded
  default, without a Prometheus server): its samples are as fresh as the read.
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

from mtrec.errors import ConfigError, check_names
from mtrec.fusion import ArmCounts, Observation
from mtrec_serve.metrics import DEPLOYMENT_ID, DEPLOYMENT_LABEL, exported_name

logger = logging.getLogger("mtrec_serve.sources")

IMPRESSIONS = exported_name("mtrec_impressions")  # ray_mtrec_impressions_total
EVENTS = exported_name("mtrec_feedback_events")  # ray_mtrec_feedback_events_total
PREDICTED = exported_name("mtrec_predicted_events")  # ray_mtrec_predicted_events_total
COUNTERS = (IMPRESSIONS, EVENTS, PREDICTED)  # what both sources read, in this order
DEFAULT_SCRAPE_INTERVAL_S = 15.0  # the PodMonitors' interval (k8s/base/podmonitor.*.yaml)
# Labels that identify one counter series of ours (Ray also adds SessionName, NodeAddress, Version, ...).
Series = tuple[str, tuple[tuple[str, str], ...]]  # (metric name, sorted labels)
Sample = tuple[Series, float, float]  # (series, cumulative value, sample time in Unix seconds)


class SourceError(Exception):
    """A read that produced no usable numbers: the message says why, ``reason`` names the kind
    (unreachable, malformed, non_finite or stale: :data:`mtrec_serve.metrics.REJECT_REASONS`)."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class CounterDeltas:
    """Differences of cumulative counter series between successive reads, with counter resets handled."""

    def __init__(self) -> None:
        self._last: dict[Series, float] = {}
        self._primed = False

    @property
    def primed(self) -> bool:
        """Whether a baseline has been read (deltas are meaningful from the next read)."""
        return self._primed

    def update(self, samples: Iterable[tuple[Series, float]]) -> dict[Series, float]:
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
    """Per-arm counts from per-series deltas: impressions summed by ``arm``, events and predicted events
    by ``(arm, task)``. SourceError (non_finite) when a sum overflows: finite series can add up to infinity."""
    impressions: dict[str, float] = {}
    events: dict[str, dict[str, float]] = {}
    predicted: dict[str, dict[str, float]] = {}
    for (name, labels), delta in deltas.items():
        lab = dict(labels)
        arm = lab.get("arm")
        if arm is None:
            continue
        if name == IMPRESSIONS:
            impressions[arm] = impressions.get(arm, 0.0) + delta
        elif name in (EVENTS, PREDICTED) and "task" in lab:
            per_task = (events if name == EVENTS else predicted).setdefault(arm, {})
            per_task[lab["task"]] = per_task.get(lab["task"], 0.0) + delta
    for arm, n in impressions.items():
        if not math.isfinite(n):
            raise SourceError(f"arm {arm!r}: impressions sum to {n} over its series", "non_finite")
    for what, sums in (("events", events), ("predicted events", predicted)):
        for arm, per_task in sums.items():
            for task, n in per_task.items():
                if not math.isfinite(n):
                    raise SourceError(f"arm {arm!r}: {task} {what} sum to {n} over its series", "non_finite")
    arms = {
        a: ArmCounts(impressions.get(a, 0.0), events.get(a, {}), predicted.get(a, {}))
        for a in set(impressions) | set(events) | set(predicted)
    }
    return Observation(timestamp, arms)


def complete(obs: Observation, arms: Iterable[str], tasks: Iterable[str]) -> Observation:
    """``obs`` with zero counts for the arms and tasks that had no events in the window (a counter
    Ray has not yet exported is a counter still at 0). Predicted events likewise, once some arm of the
    window reports any (the Ingress emits them); a window without a single predicted series keeps
    ``predicted`` empty, so a policy that needs predictions waits instead of reading zeros."""
    tasks = list(tasks)
    reported = any(c.predicted for c in obs.arms.values())
    full = {}
    for arm in set(obs.arms) | set(arms):
        counts = obs.arms.get(arm, ArmCounts(0.0, {}))
        events = {t: counts.events.get(t, 0.0) for t in tasks} | counts.events
        predicted = ({t: counts.predicted.get(t, 0.0) for t in tasks} if reported else {}) | counts.predicted
        full[arm] = ArmCounts(counts.impressions, events, predicted)
    return Observation(obs.timestamp, full, obs.stale)


class _CounterSource:
    """Shared by both sources: read samples, hold stale series, difference the rest, and turn failures
    into stale observations. ``max_age_s``: how old a sample may be and still count."""

    def __init__(self, what: str, deployment_id: str, max_age_s: float, clock: Callable[[], float]) -> None:
        if not isinstance(deployment_id, str) or not DEPLOYMENT_ID.fullmatch(deployment_id):
            raise ConfigError(f"metrics source {what}: deployment_id={deployment_id!r} is not a valid deployment id")
        self._what = what
        self._deployment = deployment_id
        self._max_age_s = max_age_s
        self._clock = clock
        self._deltas = CounterDeltas()
        self.problem: str | None = None  # why the last read was stale (None: it was good)
        self.reason: str | None = None  # the kind of that problem (a REJECT_REASONS value)
        self.newest_sample_at: float | None = None  # Unix time of the newest sample ever read

    def read(self) -> Observation | None:
        """The counts since the last read; a stale observation when the read failed (``problem`` and
        ``reason`` say why); None until a read finds the series that set the baseline."""
        now = self._clock()
        primed = self._deltas.primed
        try:
            samples = self._samples(now)
            if samples:
                newest = max(at for _, _, at in samples)
                self.newest_sample_at = max(newest, self.newest_sample_at or newest)
            fresh = [(series, value) for series, value, at in samples if now - at <= self._max_age_s]
            if samples and not fresh:
                raise SourceError(
                    f"the newest sample is {now - newest:.0f} s old, more than {self._max_age_s:g} s "
                    "(twice the scrape interval): the metrics target is not being scraped",
                    "stale",
                )
            if not fresh and primed:
                raise SourceError("no mtrec counter series in the answer (they were there before)", "stale")
            deltas = self._deltas.update(fresh)
            obs = observation(deltas, now) if primed else None
        except SourceError as e:
            return self._stale(now, e)
        self.problem = self.reason = None
        if not primed:
            if fresh:
                logger.info("metrics source %s: baseline of %d counter series recorded", self._what, len(fresh))
            else:
                self.problem = "no mtrec counter series yet (no traffic, or not scraped yet): no baseline"
        return obs

    def _stale(self, now: float, error: SourceError) -> Observation:
        self.problem = f"{self._what}: {error}"
        self.reason = error.reason
        logger.warning("metrics source %s", self.problem)
        return Observation(now, {}, stale=True)

    def _samples(self, now: float) -> list[Sample]:
        raise NotImplementedError


def _get(url: str, timeout_s: float) -> bytes:
    """The body of a GET, or SourceError (unreachable) naming the URL and what went wrong."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise SourceError(f"GET {url}: HTTP {e.code} {e.reason}", "unreachable") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, timed out, cut off
        reason = getattr(e, "reason", e)
        raise SourceError(f"GET {url}: {type(reason).__name__}: {reason}", "unreachable") from None


def _number(value: Any, where: str, what: str = "number") -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise SourceError(f"{where}: value {value!r} is not a number") from None
    if not math.isfinite(x):
        raise SourceError(f"{where}: value {value!r} is not a finite {what}", "non_finite")
    return x


def _count(value: Any, where: str) -> float:
    x = _number(value, where, "count >= 0")
    if x < 0:
        raise SourceError(f"{where}: value {value!r} is not a finite count >= 0")
    return x


def _series(name: str, labels: dict[str, str]) -> Series:
    return name, tuple(sorted((k, v) for k, v in labels.items() if k != "__name__"))


class PrometheusSource(_CounterSource):
    """Counts from a Prometheus server's HTTP API (see the module docstring).

    ``url``: the server, e.g. ``http://127.0.0.1:9090``; ``deployment_id``: the deployment whose series
    count; ``window_s``: how far back to look for a series' latest sample (at least twice
    ``scrape_interval_s``, Prometheus's interval for Ray's metrics targets, beyond which a sample is
    stale); ``timeout_s``: per HTTP request.
    """

    def __init__(
        self,
        url: str,
        deployment_id: str,
        window_s: float = 60.0,
        scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not (math.isfinite(scrape_interval_s) and scrape_interval_s > 0):
            raise ConfigError(f"PrometheusSource: scrape_interval_s={scrape_interval_s!r} must be a positive number")
        if not (math.isfinite(window_s) and window_s >= max(1.0, 2 * scrape_interval_s)):
            raise ConfigError(
                f"PrometheusSource: window_s={window_s!r} must be at least 1 s and twice "
                f"scrape_interval_s={scrape_interval_s!r}, so that a fresh sample falls in it"
            )
        super().__init__(f"prometheus {url}", deployment_id, 2 * scrape_interval_s, clock)
        self._url = url.rstrip("/")
        self._window_s = int(math.ceil(window_s))
        self._timeout_s = timeout_s

    def queries(self) -> list[str]:
        """The PromQL queries read each step (one per counter of :data:`COUNTERS`): its raw samples over
        the window."""
        selector = f'{{{DEPLOYMENT_LABEL}="{self._deployment}"}}'
        return [f"{name}{selector}[{self._window_s}s]" for name in COUNTERS]

    def _samples(self, now: float) -> list[Sample]:
        samples: list[Sample] = []
        for query, name in zip(self.queries(), COUNTERS):
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
                or data.get("resultType") != "matrix"
                or not isinstance(data.get("result"), list)
            ):
                raise SourceError(f"{url}: expected data.resultType 'matrix' with a result list, got {data!r:.120}")
            for item in data["result"]:
                try:
                    labels, values = item["metric"], item["values"]
                    at, value = values[-1]  # a series' latest sample in the window
                except (KeyError, TypeError, ValueError, IndexError):
                    raise SourceError(f"{url}: malformed result item {item!r:.120}") from None
                where = f"{url}: {name}{labels}"
                samples.append((_series(name, labels), _count(value, where), _number(at, f"{where} time")))
        return samples


class ScrapeSource(_CounterSource):
    """Counts read straight from a Ray metrics endpoint (``http://HOST:PORT/metrics``), no Prometheus.

    One endpoint is one node: this is the embedded single-node default. Only the series of
    ``deployment_id`` count; a successful read's samples are as fresh as the read.
    """

    def __init__(
        self, url: str, deployment_id: str, timeout_s: float = 5.0, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(f"scrape {url}", deployment_id, math.inf, clock)
        self._url = url
        self._timeout_s = timeout_s

    def _samples(self, now: float) -> list[Sample]:
        from prometheus_client.parser import text_string_to_metric_families

        body = _get(self._url, self._timeout_s)
        samples: list[Sample] = []
        try:
            for family in text_string_to_metric_families(body.decode("utf-8")):
                for s in family.samples:
                    if s.name in COUNTERS and s.labels.get(DEPLOYMENT_LABEL) == self._deployment:
                        value = _count(s.value, f"{self._url}: {s.name}{s.labels}")
                        samples.append((_series(s.name, s.labels), value, now))
        except (ValueError, TypeError, IndexError, UnicodeDecodeError) as e:
            raise SourceError(f"{self._url}: not Prometheus exposition text: {e}") from None
        return samples


def build_source(spec: dict[str, Any] | None, deployment_id: str, window_s: float) -> _CounterSource | None:
    """The source a controller's ``source`` argument describes (ConfigError when it is malformed), scoped
    to ``deployment_id``: ``{"kind": "prometheus", "url", "timeout_s"?, "scrape_interval_s"?}``,
    ``{"kind": "scrape", "url", "timeout_s"?}`` or None (no feedback)."""
    if spec is None:
        return None
    spec = dict(spec)
    kind = spec.pop("kind", None)
    url = spec.pop("url", None)
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"metrics source {kind!r}: url={url!r} must be an http(s) URL")
    timeout_s = float(spec.pop("timeout_s", 5.0))
    if kind == "prometheus":
        interval = float(spec.pop("scrape_interval_s", DEFAULT_SCRAPE_INTERVAL_S))
        check_names(f"metrics source {kind!r}", spec, ("kind", "url", "timeout_s", "scrape_interval_s"), "key")
        return PrometheusSource(url, deployment_id, window_s, interval, timeout_s)
    if kind == "scrape":
        check_names(f"metrics source {kind!r}", spec, ("kind", "url", "timeout_s"), "key")
        return ScrapeSource(url, deployment_id, timeout_s)
    raise ConfigError(f"metrics source kind {kind!r} is not one of: prometheus, scrape")
