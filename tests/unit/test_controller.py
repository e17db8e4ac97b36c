"""The controller's logic (mtrec_serve.controller.ControlLoop) without Ray: fake source, fake clock, fake metrics."""

from __future__ import annotations

import json
import math
import re

import pytest

from mtrec.errors import ConfigError
from mtrec.fusion import ArmCounts, Observation
from mtrec_serve.controller import ControlLoop, state_file

TASKS = ["click", "buy"]
WEIGHTS = {"click": 1.0, "buy": 1.0}
LIMITS = {"min_events": 10, "max_step": 0.1, "smoothing": 0.5}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeSource:
    """Yields queued readings, whose samples are as fresh as the read; an exhausted queue reads as a
    stale observation (an outage: no new sample)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.queue: list[Observation | None] = []
        self.problem: str | None = None
        self.reason: str | None = None
        self.newest_sample_at: float | None = None

    def window(
        self, impressions: float, events: dict[str, float], arms: list[str] | None = None, predicted=None
    ) -> None:
        counts = ArmCounts(impressions, events, predicted or {})
        self.queue.append(Observation(0.0, {a: counts for a in arms or ["main"]}))

    def read(self) -> Observation | None:
        self.clock.t += 10
        if not self.queue:
            self.problem = "prometheus http://x: ConnectionRefusedError"
            self.reason = "unreachable"
            return Observation(self.clock.t, {}, stale=True)
        self.problem = self.reason = None
        self.newest_sample_at = self.clock.t
        obs = self.queue.pop(0)
        return None if obs is None else Observation(self.clock.t, obs.arms)


class Recorder:
    def __init__(self) -> None:
        self.weights: list[tuple[dict, dict, set]] = []
        self.staleness: list[float] = []
        self.updates: list[str] = []
        self.rejected: list[str] = []

    def set_weights(self, weights, traffic, gone) -> None:
        self.weights.append((weights, traffic, set(gone)))

    def set_staleness(self, s: float) -> None:
        self.staleness.append(s)

    def record_update(self, action: str) -> None:
        self.updates.append(action)

    def record_rejected_read(self, reason: str) -> None:
        self.rejected.append(reason)


def loop(tmp_path, policy="proportional", params=None, source=True, clock=None, publish=None, limits=LIMITS):
    clock = clock or Clock()
    src = FakeSource(clock) if source else None
    control = ControlLoop(
        TASKS, WEIGHTS, policy, params, limits, src, tmp_path / "state.json", clock, publish or Recorder()
    )
    return control, src, clock


def test_feedback_moves_weights_toward_the_busier_task_and_persists(tmp_path):
    publish = Recorder()
    control, src, _ = loop(tmp_path, publish=publish)
    src.queue.append(None)  # baseline read
    for _ in range(3):
        src.window(1000, {"click": 300, "buy": 30})
    start = control.decision()
    assert start["version"] == 0 and start["weights"]["main"] == {"click": 0.5, "buy": 0.5}
    steps = [control.step() for _ in range(4)]
    assert [s["action"] for s in steps] == ["baseline", "update", "update", "update"]
    w = steps[-1]["weights"]["main"]
    assert w["click"] == pytest.approx(0.8) and w["buy"] == pytest.approx(0.2)  # 3 steps of 0.1 toward 10:1
    assert steps[-1]["version"] == 3 and steps[-1]["policy"] == "proportional"
    assert "proportional to live rates" in steps[-1]["reason"]
    assert publish.weights[-1][0]["main"] == w and publish.updates == ["baseline", "update", "update", "update"]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["version"] == 3 and state["policy_state"]["decision"]["weights"]["main"] == w
    history = control.history(2)
    assert [h["version"] for h in history] == [2, 3] and history[-1]["weights"]["main"] == w
    assert control.history(0) == []


def test_outage_holds_weights_and_staleness_rises(tmp_path):
    publish = Recorder()
    control, src, clock = loop(tmp_path, publish=publish)
    src.queue.append(None)
    src.window(1000, {"click": 300, "buy": 30})
    control.step()
    good = control.step()
    held = [control.step() for _ in range(3)]  # the queue is empty: the source is down
    assert all(h["action"] == "hold" and h["weights"] == good["weights"] for h in held)
    assert all(h["version"] == good["version"] for h in held)
    assert "ConnectionRefusedError" in held[-1]["reason"]
    assert [round(h["staleness_s"]) for h in held] == [10, 20, 30]
    assert publish.staleness[-3:] == [10, 20, 30]
    assert publish.rejected == ["unreachable"] * 3
    src.window(1000, {"click": 300, "buy": 30})
    back = control.step()
    assert back["action"] == "update" and back["staleness_s"] == 0


def test_restart_resumes_from_the_state_file(tmp_path):
    params = {"values": {"buy": 1.0}, "seed": 3}
    limits = {"min_events": 5, "max_step": 0.1, "smoothing": 0.5}
    a, src_a, clock = loop(tmp_path / "a", "calibrated", params, limits=limits)
    b, src_b, _ = loop(tmp_path / "b", "calibrated", params, limits=limits)
    arms = list(a.decision()["traffic"])
    for control, src in ((a, src_a), (b, src_b)):
        src.queue.append(None)
        for _ in range(6):
            src.window(1000, {"click": 200, "buy": 20}, arms, {"click": 400, "buy": 20})
        for _ in range(4):
            control.step()
    resumed, src_r, _ = loop(tmp_path / "b", "calibrated", params, clock=clock, limits=limits)
    assert resumed.decision() | {"staleness_s": 0} == b.decision() | {"staleness_s": 0}
    src_r.queue = src_b.queue
    for _ in range(2):  # the resumed controller continues exactly as the one that never stopped
        assert resumed.step()["weights"] == a.step()["weights"]
    assert resumed.decision()["version"] == a.decision()["version"]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "config": {}})])
def test_bad_or_foreign_state_is_moved_aside_and_a_fresh_policy_starts(tmp_path, content):
    (tmp_path / "state.json").write_text(content)
    control, _, _ = loop(tmp_path)
    assert control.decision()["version"] == 0 and control.decision()["weights"]["main"]["click"] == 0.5
    assert len(list(tmp_path.glob("state.json.rejected-*"))) == 1 and not (tmp_path / "state.json").exists()


def test_state_of_another_configuration_is_not_resumed(tmp_path):
    control, src, _ = loop(tmp_path)
    src.queue.append(None)
    src.window(1000, {"click": 300, "buy": 30})
    control.step(), control.step()
    other, _, _ = loop(tmp_path, limits=LIMITS | {"max_step": 0.2})
    assert other.decision()["version"] == 0
    assert list(tmp_path.glob("state.json.rejected-*"))


def test_no_source_holds_and_bad_configuration_is_a_config_error(tmp_path):
    control, _, _ = loop(tmp_path, source=False)
    assert control.step()["action"] == "hold" and control.decision()["version"] == 0
    with pytest.raises(ConfigError, match="one weight per task"):
        ControlLoop(["click", "buy"], {"click": 1.0}, publish=Recorder())
    with pytest.raises(ConfigError, match="unknown limit"):
        ControlLoop(TASKS, WEIGHTS, limits={"max_stp": 0.1}, publish=Recorder())
    with pytest.raises(ConfigError, match="unknown policy"):
        ControlLoop(TASKS, WEIGHTS, policy="greedy", publish=Recorder())


def test_retired_arms_are_published_as_gone(tmp_path):
    """The calibration turns round: the candidate it started is superseded, and its arm is gone."""
    publish = Recorder()
    control, src, _ = loop(tmp_path, "calibrated", {"values": {"click": 0.1, "buy": 1.0}}, publish=publish)
    arms = list(control.decision()["traffic"])
    src.queue.append(None)
    src.window(1000, {"click": 200, "buy": 20}, arms, {"click": 400, "buy": 20})  # clicks over-predicted
    control.step(), control.step()
    first = set(control.decision()["traffic"])
    assert len(first) == 3  # holdout, main and a candidate
    src.window(1000, {"click": 200, "buy": 20}, list(first), {"click": 100, "buy": 200})  # now the purchases
    control.step()
    gone = publish.weights[-1][2]
    assert gone and gone <= first and not gone & set(control.decision()["weights"])


def test_staleness_is_the_age_of_the_newest_sample(tmp_path):
    """A source whose samples stopped coming (a dead target) makes the weights hold and the staleness
    the age of its newest sample, not the time since the last read that answered."""
    publish = Recorder()
    control, src, clock = loop(tmp_path, publish=publish)
    assert control.decision()["staleness_s"] == 0  # since start-up, until a sample is read
    src.queue.append(None)
    control.step()
    sampled = src.newest_sample_at
    src.read = lambda: (  # Prometheus answers, but with the same old samples
        setattr(clock, "t", clock.t + 10) or setattr(src, "reason", "stale") or Observation(clock.t, {}, stale=True)
    )
    held = [control.step() for _ in range(3)]
    assert [h["action"] for h in held] == ["hold"] * 3
    assert held[-1]["staleness_s"] == clock.t - sampled == 30
    assert publish.rejected == ["stale"] * 3
    again, _, _ = loop(tmp_path, clock=clock)  # the newest sample's time survives a restart
    assert again.decision()["staleness_s"] == 30


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the policy dividing infinities: the poison
def test_a_tally_that_overflows_is_never_used(tmp_path):
    """Windows of finite but huge counts drive a tally to infinity: that update is undone, the last good
    weights hold, the rejection is counted, and the policy goes on from its last good state."""
    publish = Recorder()
    control, src, _ = loop(tmp_path, publish=publish, limits=LIMITS | {"smoothing": 0.9})
    src.queue.append(None)
    src.window(1000, {"click": 300, "buy": 30})
    src.window(1000, {"click": 300, "buy": 1.5e308})
    src.window(1000, {"click": 300, "buy": 1.5e308})  # 0.9 * 1.5e308 + 1.5e308 overflows
    src.window(1000, {"click": 300, "buy": 30})
    control.step(), control.step()
    good = control.step()
    assert good["action"] == "update" and all(math.isfinite(w) for w in good["weights"]["main"].values())
    held = control.step()
    assert held["action"] == "hold" and held["weights"] == good["weights"] and held["version"] == good["version"]
    assert re.search(r"hold: policy\.\S+ = (nan|inf); .*last good weights kept", held["reason"]), held["reason"]
    assert publish.rejected == ["non_finite"]
    saved = json.loads((tmp_path / "state.json").read_text())  # what was persisted is the last good state
    assert saved["version"] == good["version"] and saved["policy_state"]["decision"]["weights"] == good["weights"]
    after = control.step()
    assert after["action"] != "hold" and all(math.isfinite(w) for w in after["weights"]["main"].values())


def test_each_deployment_has_its_own_state_file(tmp_path):
    assert (
        state_file(str(tmp_path / "controller-state.json"), "prod.mtrec")
        == tmp_path / "controller-state.prod.mtrec.json"
    )
    assert state_file(str(tmp_path / "state"), "dev") == tmp_path / "state.dev"
    assert state_file(None, "dev") is None


def test_calibrated_gets_the_bundles_scales_and_waits_for_predictions(tmp_path):
    """The bundle's fusion scales reach a policy that takes them (and belong to the configuration a state
    file must match); calibrated waits, naming the tasks, until every arm reports predicted events."""
    scales = {"click": 0.2, "buy": 0.02}

    def calibrated(scales: dict[str, float]) -> ControlLoop:
        source = FakeSource(Clock())
        return ControlLoop(
            TASKS, WEIGHTS, "calibrated", None, LIMITS, source, tmp_path / "s.json", publish=Recorder(), scales=scales
        )

    control = calibrated(scales)
    assert control._policy.to_state()["params"]["scales"] == scales
    src = control._source
    arms = list(control.decision()["traffic"])
    assert arms[0] == "holdout"  # laid out first, so its users stay put
    src.queue.append(None)
    src.window(1000, {"click": 200, "buy": 20}, arms)  # no predictions reported
    control.step()
    d = control.step()
    assert d["action"] == "wait" and "no predictions reported for click, buy" in d["reason"]
    src.window(1000, {"click": 200, "buy": 20}, arms, {"click": 400, "buy": 20})
    assert control.step()["action"] != "wait"
    # static takes no scales: nothing is added to its parameters
    static = ControlLoop(TASKS, WEIGHTS, "static", publish=Recorder(), scales=scales)
    assert static._config["policy_params"] == {}
    # another bundle's scales: the state file is not resumed
    other = calibrated({"click": 0.3, "buy": 0.02})
    assert other.decision()["version"] == 0 and list(tmp_path.glob("s.json.rejected-*"))
