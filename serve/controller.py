"""The WeightController: the fusion weights in force, updated from live feedback by a policy.

Every ``period_s`` the controller reads one window of per-arm counts from its source
(:mod:`mtrec_serve.sources`: a Prometheus server, or Ray's metrics endpoint directly), hands it to a pure
policy of :mod:`mtrec.fusion` (static, proportional, target, bandit), persists the policy's state,
publishes the weights, their staleness and the action as metrics (:mod:`mtrec_serve.metrics`) and logs
each change with its reason. When the source fails (Prometheus down, garbage answers) the policy
holds the last good weights and the staleness gauge rises; the Ingress keeps serving.

State (the policy's ``to_state()``, the decision version and the time of the last good read) is
written atomically (a temporary file renamed over the old one) after every step, and read back at
start, so a replica that Serve restarts resumes where the old one was. A state file that is
unreadable, or written for another configuration (policy, tasks, weights, parameters or limits), is
logged, moved aside as ``STATE.rejected-<time>`` and replaced by a fresh policy: a bad file never
stops the controller from starting (no crash loop), and nothing is lost for inspection.

:class:`ControlLoop` is the logic (no Ray: unit tests drive it with a fake source and clock);
:class:`WeightController` is the Serve deployment of the agreed interface around it.
"""

from __future__ import annotations

import asyncio
import collections
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
from mtrec.fusion import Decision, Limits, Observation, Policy, build_policy, restore_policy
from mtrec.io import atomic_write_text
from mtrec_serve import metrics as serve_metrics
from mtrec_serve.sources import build_source, complete

logger = logging.getLogger("ray.serve")  # Serve routes this logger to the replica's log file

STATE_FORMAT = 1
HISTORY = 1000  # controller steps kept for history()


class Source(Protocol):
    problem: str | None

    def read(self) -> Observation | None: ...


class ControlLoop:
    """The controller's logic: source -> policy -> state file -> metrics. See the module docstring.

    ``source`` None: no feedback, the weights hold. ``publish``: the metrics hooks (``set_weights``,
    ``set_staleness``, ``record_update``), :mod:`mtrec_serve.metrics` by default.
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
    ) -> None:
        missing = [t for t in tasks if t not in weights]
        extra = sorted(set(weights) - set(tasks))
        if missing or extra or not tasks:
            raise ConfigError(f"WeightController: weights {weights} must give one weight per task of {tasks}")
        params = dict(policy_params or {})
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
            self._version, self._last_good, self._updated_at = 0, clock(), clock()
        else:
            self._policy, self._version, self._last_good, self._updated_at = restored
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
        if self._source is None:
            action, reason = "hold", "no metrics source configured: weights held"
        elif obs is None:
            self._last_good = now
            action, reason = "baseline", self._source.problem or "first read of the counters: baseline recorded"
        else:
            obs = complete(obs, before.traffic, self._policy.tasks)
            decision = self._policy.update(obs)
            action, reason = decision.action, decision.reason
            if obs.stale:
                reason = f"hold: {self._source.problem or 'metrics are stale'}"
            else:
                self._last_good = now
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
        return self.decision()

    def step(self) -> dict[str, Any]:
        """One control iteration now: read, then apply."""
        return self.apply(self.read())

    def decision(self) -> dict[str, Any]:
        """The weights in force: the agreed ``decision()`` dict (plus ``main``, the arm of most traffic)."""
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
        }

    def history(self, n: int = 50) -> list[dict[str, Any]]:
        """The last ``n`` steps, oldest first (weights and traffic on the steps that changed them)."""
        return list(self._history)[-int(n) :] if n > 0 else []

    def staleness_s(self) -> float:
        return max(0.0, self._clock() - self._last_good)

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
            "last_good": self._last_good,
            "updated_at": self._updated_at,
            "policy_state": self._policy.to_state(),
        }
        path = self._state_path
        try:
            atomic_write_text(path, json.dumps(doc, allow_nan=False))  # a reader sees the old state or the new
        except (OSError, ValueError) as e:
            logger.error("WeightController: could not write state %s: %s", path, e)

    def _restore(self) -> tuple[Policy, int, float, float] | None:
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
            version, last_good, updated_at = int(doc["version"]), float(doc["last_good"]), float(doc["updated_at"])
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


def _limits(limits: dict[str, float] | None) -> Limits:
    check_names("WeightController", limits or {}, [f.name for f in fields(Limits)], noun="limit")
    return Limits(**(limits or {}))


@ray.serve.deployment(
    num_replicas=1, max_ongoing_requests=256, health_check_period_s=5, ray_actor_options={"num_cpus": 0.1}
)  # mostly idle: one metrics query per period
class WeightController:
    """The Serve deployment of the agreed interface: ``decision()``, ``step()``, ``history(n)``.

    ``source``: ``{"kind": "prometheus", "url", "app"?}``, ``{"kind": "scrape", "url", "app"?}`` or
    None (weights hold); ``app`` defaults to this replica's Serve application. ``window_s``: how far
    back Prometheus may look for a series' latest sample (see :class:`mtrec_serve.sources.PrometheusSource`).
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
    ) -> None:
        if not (math.isfinite(period_s) and period_s > 0):
            raise ConfigError(f"WeightController: period_s={period_s!r} must be a positive number of seconds")
        app = ray.serve.get_replica_context().app_name or None
        self._control = ControlLoop(
            tasks, weights, policy, policy_params, limits, build_source(source, app, window_s), state_path
        )
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
            return self._control.apply(obs)

    async def decision(self) -> dict[str, Any]:
        return self._control.decision()

    async def history(self, n: int = 50) -> list[dict[str, Any]]:
        return self._control.history(n)

    def check_health(self) -> None:
        """Serve restarts the replica when this raises: the control loop must still be running."""
        if self._task.done():
            raise RuntimeError(f"WeightController control loop ended: {self._task}")
