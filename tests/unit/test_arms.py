"""Arm choice (a sticky hash of the request id into the traffic shares) and the feedback ledger."""

from __future__ import annotations

from collections import Counter

import pytest

from mtrec.arms import FeedbackLedger, choose_arm


def test_arm_choice_is_deterministic_and_follows_the_shares():
    traffic = {"main": 0.8, "explore-1": 0.15, "explore-2": 0.05}
    ids = [f"req-{i}" for i in range(20_000)]
    arms = [choose_arm(i, traffic) for i in ids]
    assert arms == [choose_arm(i, dict(reversed(traffic.items()))) for i in ids]  # order of the dict is irrelevant
    counts = Counter(arms)
    for arm, share in traffic.items():
        assert abs(counts[arm] / len(ids) - share) < 0.01, (arm, counts)
    assert {choose_arm(i, {"main": 1.0, "off": 0.0}) for i in ids[:500]} == {"main"}
    with pytest.raises(ValueError, match="shares must be finite"):
        choose_arm("x", {"main": float("nan")})
    with pytest.raises(ValueError):
        choose_arm("x", {})


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
