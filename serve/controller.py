"""The WeightController: the fusion weights in force, updated from live feedback by a policy.

Every ``period_s`` the controller reads one window of per-arm counts from its source
(:mod:`mtrec_serve.sources`: a Prometheus server, or Ray's metrics endpoint directly), hands it to a pure
policy of :mod:`mtrec.fusion` (static, proportional, target, calibrated), persists the policy's state,
publishes the weights, their staleness and the action as metrics (:mod:`mtrec_serve.metrics`; the
deployment adds what the policy measured against the holdout: the main arm's lift and the guardrails,
:func:`mtrec_serve.metrics.set_report`) and logs each change with its reason. When the source fails (Prometheus down, garbage answers, samples older
than twice the scrape interval) the policy holds the last good weights, the reading is counted in
``mtrec_controller_rejected_reads{reason}`` and the staleness gauge (the age of the newest sample
read) rises; the Ingress keeps serving.

A tally or weight that is not finite is never used: the policy's state is kept before each update,
and an update that leaves a number that is not finite anywhere in the policy (an overflowing tally,
a NaN weight) is undone: the window is dropped, the last good weights hold, and the reading is
counted as rejected (``non_finite``).

State (the policy's ``to_state()``, the decision version and the time of the newest sample read) is
written atomically (a temporary file renamed over the old one) after every step, and read back at
start, so a replica that Serve restarts resumes where the old one was. A state file that is
unreadable, or written for another configuration (policy, tasks, weights, parameters or limits), is
logged, moved aside as ``STATE.rejected-<time>`` and replaced by a fresh policy: a bad file never
stops the controller from starting (no crash loop), and nothing is lost for inspection. Each
deployment has its own state file (:func:`state_file`), and reads only its own series.

:class:`ControlLoop` is the logic (no Ray: unit tests drive it with a fake source and clock);
:class:`WeightController` is the Serve deployment of the agreed interface around it.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Protocol

import ray.serve

from mtrec.errors import ConfigError, check_names
from mtrec.fusion import POLICIES, Decision, Limits, Observation, Policy, build_policy, restore_policy
from mtrec.io import atomic_write_text
from mtrec_serve import metrics as serve_metrics
from mtrec_serve.metrics import deployment_id as resolve_deployment_id
from mtrec_serve.sources import build_source, complete

logger = logging.getLogger("ray.serve")  # Serve routes this logger to the replica's log file

STATE_FORMAT = 1
HISTORY = 1000  # controller steps kept for history()


class Source(Protocol):
    problem: str | None  # why the last read was stale
    reason: str | None  # its kind, a mtrec_serve.metrics.REJECT_REASONS value
    newest_sample_at: float | None  # Unix time of the newest sample read

    def read(self) -> Observation | None: ...


class ControlLoop:
    """The controller's logic: source -> policy -> state file -> metrics. See the module docstring.

    ``source`` None: no feedback, the weights hold. ``publish``: the metrics hooks (``set_weights``,
    ``set_staleness``, ``record_update``, ``record_rejected_read``), :mod:`mtrec_serve.metrics` by default.
    ``scales``: the bundle's fusion scales (task -> the scale each task's predictions are divided by
    before fusion), given to a policy that takes ``scales`` (``calibrated``: its calibrated weights and
    its default ``values``, the initial weights divided by the scales, depend on them) unless
    ``policy_params`` sets them; they are part of the configuration a state file must match, so a
    retrained bundle does not resume a policy fitted to the old one's scales.
    """

    def __init__(
        self,
        tasks: list[str],
        weights: dict[str, float],
        policy: str = "static",
        policy_params: dict[str, Any] | None = None,
        limits: dict[str, float] | None = None,
        source: Source | None = None,
        state_path: str | Path | None = None,
        clock: Callable[[], float] = time.time,
        publish: Any = serve_metrics,
        scales: dict[str, float] | None = None,
    ) -> None:
        missing = [t for t in tasks if t not in weights]
        extra = sorted(set(weights) - set(tasks))
        if missing or extra or not tasks:
            raise ConfigError(f"WeightController: weights {weights} must give one weight per task of {tasks}")
        params = dict(policy_params or {})
        if scales is not None and "scales" not in params and _takes(policy, "scales"):
            params["scales"] = {t: float(scales[t]) for t in tasks if t in scales}
        self._config = {
            "policy": policy,
            "tasks": list(tasks),
            "weights": {t: float(weights[t]) for t in tasks},
            "policy_params": dict(params),
            "limits": asdict(_limits(limits)),
        }
        self._config = json.loads(json.dumps(self._config))  # as it reads back from the state file
        self._source = source
        self._state_path = Path(state_path) if state_path else None
        self._clock = clock
        self._publish = publish
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)
        self._arms_published: set[str] = set()
        restored = self._restore()
        if restored is None:
            seed = int(params.pop("seed", 0))
            self._policy: Policy = build_policy(policy, self._config["weights"], _limits(limits), seed, **params)
            self._version, self._newest, self._updated_at = 0, None, clock()
        else:
            self._policy, self._version, self._newest, self._updated_at = restored
        self._started = clock()  # the staleness until a first sample is read
        self._action, self._reason = self._policy.current.action, self._policy.current.reason
        self._publish_metrics(self._policy.current)

    # ------------------------------------------------------------------------------ public

    def read(self) -> Observation | None:
        """One window from the source (blocking I/O: the deployment runs it in a thread)."""
        return None if self._source is None else self._source.read()

    def apply(self, obs: Observation | None) -> dict[str, Any]:
        """Feed one reading to the policy, persist, publish and log; the decision in force after it."""
        now = self._clock()
        before = self._policy.current
        rejected = None  # why this reading is refused (a REJECT_REASONS value)
        if self._source is None:
            action, reason = "hold", "no metrics source configured: weights held"
        else:
            seen = self._source.newest_sample_at
            if seen is not None:
                self._newest = max(seen, self._newest if self._newest is not None else seen)
            if obs is None:
                action, reason = "baseline", self._source.problem or "first read of the counters: baseline recorded"
            else:
                action, reason, rejected = self._update(complete(obs, before.traffic, self._policy.tasks))
        after = self._policy.current
        changed = after.weights != before.weights or after.traffic != before.traffic
        if changed:
            self._version += 1
            self._updated_at = now
            logger.info("fusion weights v%d (%s): %s; now %s", self._version, action, reason, after.weights)
        elif action == "hold":
            logger.warning("fusion weights v%d held: %s", self._version, reason)
        self._action, self._reason = action, reason
        self._history.append(
            {"at": now, "action": action, "reason": reason, "version": self._version}
            | ({"weights": after.weights, "traffic": after.traffic} if changed else {})
        )
        self._save()
        self._publish_metrics(after)
        self._publish.record_update(action)
        if rejected is not None:
            self._publish.record_rejected_read(rejected)
        return self.decision()

    def _update(self, obs: Observation) -> tuple[str, str, str | None]:
        """The policy's step on ``obs``: ``(action, reason, why the reading was rejected or None)``.
        An update that leaves a number that is not finite in the policy is undone (module docstring)."""
        if obs.stale:
            self._policy.update(obs)  # the policy holds (and keeps the hold in its history)
            return "hold", f"hold: {self._source.problem or 'metrics are stale'}", self._source.reason or "stale"
        before = self._policy.to_state()
        decision = self._policy.update(obs)
        problem = _non_finite(self._policy.to_state(), "policy")
        if problem is None:
            return decision.action, decision.reason, None
        self._policy = restore_policy(before)
        logger.error("WeightController: %s after reading %s; window dropped, weights held", problem, obs.to_dict())
        return "hold", f"hold: {problem}; this window is dropped and the last good weights kept", "non_finite"

    def step(self) -> dict[str, Any]:
        """One control iteration now: read, then apply."""
        return self.apply(self.read())

    def decision(self) -> dict[str, Any]:
        """The weights in force: the agreed ``decision()`` dict (plus ``main``, the arm of most traffic, and
        ``report``, what the policy measured: for ``calibrated`` the main arm's lift over the holdout with
        its always-valid 95 % interval, the guardrails and the candidate's stage)."""
        d = self._policy.current
        return {
            "version": self._version,
            "weights": d.weights,
            "traffic": d.traffic,
            "main": d.main,
            "action": self._action,
            "reason": self._reason,
            "updated_at": self._updated_at,
            "staleness_s": self.staleness_s(),
            "policy": self._policy.name,
            "report": d.report,
        }

    def history(self, n: int = 50) -> list[dict[str, Any]]:
        """The last ``n`` steps, oldest first (weights and traffic on the steps that changed them)."""
        return list(self._history)[-int(n) :] if n > 0 else []

    def staleness_s(self) -> float:
        """The age of the newest sample read (since start-up until one is read)."""
        return max(0.0, self._clock() - (self._newest if self._newest is not None else self._started))

    # ------------------------------------------------------------------------------ state and metrics

    def _publish_metrics(self, after: Decision) -> None:
        gone = self._arms_published - set(after.weights)
        self._publish.set_weights(after.weights, after.traffic, gone)
        self._arms_published = set(after.weights)
        self._publish.set_staleness(self.staleness_s())

    def _save(self) -> None:
        if self._state_path is None:
            return
        doc = {
            "format": STATE_FORMAT,
            "config": self._config,
            "version": self._version,
            "last_good": self._newest,
            "updated_at": self._updated_at,
            "policy_state": self._policy.to_state(),
        }
        path = self._state_path
        try:
            atomic_write_text(path, json.dumps(doc, allow_nan=False))  # a reader sees the old state or the new
        except (OSError, ValueError) as e:
            logger.error("WeightController: could not write state %s: %s", path, e)

    def _restore(self) -> tuple[Policy, int, float | None, float] | None:
        """The policy and counters of the state file, or None (no file, or rejected: see the module docstring)."""
        path = self._state_path
        if path is None or not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != STATE_FORMAT:
                raise ConfigError(f"format {doc.get('format')!r}, expected {STATE_FORMAT}")
            if doc["config"] != self._config:
                diff = sorted(k for k in self._config if doc["config"].get(k) != self._config[k])
                raise ConfigError(f"written for another configuration (differs in {', '.join(diff)})")
            policy = restore_policy(doc["policy_state"])
            version, updated_at = int(doc["version"]), float(doc["updated_at"])
            last_good = None if doc["last_good"] is None else float(doc["last_good"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as e:
            rejected = path.with_name(f"{path.name}.rejected-{int(self._clock())}")
            logger.error(
                "WeightController: state %s rejected (%s: %s); moved to %s; starting fresh",
                path,
                type(e).__name__,
                e,
                rejected,
            )
            try:
                os.replace(path, rejected)
            except OSError as move_error:
                logger.error("WeightController: could not move %s aside: %s", path, move_error)
            return None
        logger.info("WeightController: resumed %s policy at v%d from %s", policy.name, version, path)
        return policy, version, last_good, updated_at


def _non_finite(value: Any, where: str) -> str | None:
    """Where in ``value`` (JSON-like: dicts, lists, numbers) a number is not finite, e.g.
    ``policy.state.tallies.main.events.dwell = inf``; None when every number is finite."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} = {value}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        problem = _non_finite(item, f"{where}.{key}")
        if problem is not None:
            return problem
    return None


def state_file(state_path: str | None, deployment_id: str) -> Path | None:
    """Where deployment ``deployment_id``'s controller keeps its state: ``state_path`` with the id before
    the suffix (``controller-state.json`` -> ``controller-state.<id>.json``), so deployments that share a
    volume and a config never share (or overwrite) a state file; None when not persisted."""
    if not state_path:
        return None
    path = Path(state_path)
    return path.with_name(f"{path.stem}.{deployment_id}{path.suffix}")


def _takes(policy: str, param: str) -> bool:
    """Whether policy ``policy`` (a name of :data:`mtrec.fusion.POLICIES`; False when unknown) takes ``param``."""
    cls = POLICIES.get(policy)
    return cls is not None and param in inspect.signature(cls.__init__).parameters


def _limits(limits: dict[str, float] | None) -> Limits:
    check_names("WeightController", limits or {}, [f.name for f in fields(Limits)], noun="limit")
    return Limits(**(limits or {}))


@ray.serve.deployment(
    num_replicas=1, max_ongoing_requests=256, health_check_period_s=5, ray_actor_options={"num_cpus": 0.1}
)  # mostly idle: one metrics query per period
class WeightController:
    """The Serve deployment of the agreed interface: ``decision()``, ``step()``, ``history(n)``.

    ``source``: ``{"kind": "prometheus", "url", "scrape_interval_s"?}``, ``{"kind": "scrape", "url"}`` or
    None (weights hold) (see :func:`mtrec_serve.sources.build_source`). ``deployment_id``: whose series
    count and whose state file this is (None: derived from this replica's Serve application, see
    :func:`mtrec_serve.metrics.deployment_id`). ``window_s``: how far back Prometheus may look for a
    series' latest sample (see :class:`mtrec_serve.sources.PrometheusSource`). ``scales``: the bundle's
    fusion scales, for a policy that needs them (see :class:`ControlLoop`).
    """

    def __init__(
        self,
        tasks: list[str],
        weights: dict[str, float],
        policy: str = "static",
        policy_params: dict[str, Any] | None = None,
        limits: dict[str, float] | None = None,
        source: dict[str, Any] | None = None,
        state_path: str | None = None,
        period_s: float = 10.0,
        window_s: float = 60.0,
        deployment_id: str | None = None,
        scales: dict[str, float] | None = None,
    ) -> None:
        if not (math.isfinite(period_s) and period_s > 0):
            raise ConfigError(f"WeightController: period_s={period_s!r} must be a positive number of seconds")
        try:
            deployment = resolve_deployment_id(deployment_id, ray.serve.get_replica_context().app_name)
        except ValueError as e:
            raise ConfigError(f"WeightController: {e}") from e
        serve_metrics.scope(deployment)  # before the control loop publishes its first metrics
        self._control = ControlLoop(
            tasks,
            weights,
            policy,
            policy_params,
            limits,
            build_source(source, deployment, window_s),
            state_file(state_path, deployment),
            scales=scales,
        )
        serve_metrics.set_report(self._control.decision()["report"])
        self._period_s = float(period_s)
        self._lock = asyncio.Lock()  # one step at a time: the background loop and step() calls
        # The constructor runs on the replica's event loop, so the control loop lives beside the requests.
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            try:
                await self.step()
            except Exception:  # a step must never end the loop; the next one tries again
                logger.exception("WeightController: control step failed")

    async def step(self) -> dict[str, Any]:
        """One control iteration now (the background loop also runs one every ``period_s``)."""
        async with self._lock:
            obs = await asyncio.to_thread(self._control.read)  # HTTP to the source, off the event loop
            decision = self._control.apply(obs)
            serve_metrics.set_report(decision["report"])  # the lift and guardrails against the holdout
            return decision

    async def decision(self) -> dict[str, Any]:
        return self._control.decision()

    async def history(self, n: int = 50) -> list[dict[str, Any]]:
        return self._control.history(n)

    def check_health(self) -> None:
        """Serve restarts the replica when this raises: the control loop must still be running."""
        if self._task.done():
            raise RuntimeError(f"WeightController control loop ended: {self._task}")
