"""Arm choice (a sticky hash of the user id into the traffic shares) and the feedback ledger."""

from __future__ import annotations

from collections import Counter

import pytest

from mtrec.arms import FeedbackLedger, choose_arm


def test_arm_choice_is_deterministic_and_follows_the_shares():
    traffic = {"main": 0.8, "explore-1": 0.15, "explore-2": 0.05}
    ids = [f"user-{i}" for i in range(20_000)]
    arms = [choose_arm(i, traffic) for i in ids]
    assert arms == [choose_arm(i, dict(traffic)) for i in ids]
    counts = Counter(arms)
    for arm, share in traffic.items():
        assert abs(counts[arm] / len(ids) - share) < 0.01, (arm, counts)
    assert {choose_arm(i, {"main": 1.0, "off": 0.0}) for i in ids[:500]} == {"main"}
    with pytest.raises(ValueError, match="shares must be finite"):
        choose_arm("x", {"main": float("nan")})
    with pytest.raises(ValueError):
        choose_arm("x", {})


def test_users_stay_in_the_holdout_and_in_a_ramping_candidate():
    """The layout follows the order of the arms: the holdout (first) keeps the same users whatever the
    other arms do, and a candidate (last) keeps its users as its share grows."""
    users = [f"user-{i}" for i in range(20_000)]
    ramp = [{"holdout": 0.05, "a1": 0.95 * (1 - share), "a2": 0.95 * share} for share in (0.01, 0.05, 0.2, 0.5)] + [
        {"holdout": 0.05, "a2": 0.95},
        {"holdout": 0.05, "a2": 0.475, "a3": 0.475},
        {"holdout": 0.05, "a0": 0.95},
    ]
    layouts = [[choose_arm(u, traffic) for u in users] for traffic in ramp]
    holdout = {u for u, a in zip(users, layouts[0]) if a == "holdout"}
    assert abs(len(holdout) / len(users) - 0.05) < 0.005
    for layout in layouts:
        assert {u for u, a in zip(users, layout) if a == "holdout"} == holdout
    candidate = [{u for u, a in zip(users, layout) if a == "a2"} for layout in layouts[:5]]
    assert all(a <= b for a, b in zip(candidate, candidate[1:]))  # nested: nobody leaves as it ramps
    assert len(candidate[0]) > 100


def test_feedback_ledger_counts_once_forgets_old_requests_and_names_what_is_wrong():
    now = [0.0]
    ledger = FeedbackLedger(ttl_s=10, max_requests=2, clock=lambda: now[0])
    ledger.remember("r1", "main", [1, "b"])
    assert ledger.record("r1", "1", ["click"]) == ("main", ["click"], [])  # ids compare as strings
    assert ledger.record("r1", 1, ["click", "buy"]) == ("main", ["buy"], ["click"])
    with pytest.raises(LookupError, match="item_id 'zz' was not served in request 'r1'"):
        ledger.record("r1", "zz", ["click"])
    ledger.remember("r2", "explore", ["x"])
    ledger.remember("r3", "main", ["y"])  # over max_requests: r1, the oldest, goes
    with pytest.raises(LookupError, match="request_id 'r1'"):
        ledger.record("r1", 1, ["click"])
    now[0] = 11.0  # past the TTL
    with pytest.raises(LookupError, match="request_id 'r2'"):
        ledger.record("r2", "x", ["click"])
    assert len(ledger) == 2
