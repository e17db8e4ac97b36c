"""Which fusion-weight arm serves a request, and what each served request showed, for its feedback.

:func:`choose_arm` hashes the user id into the arms' traffic shares: the arm is decided server-side,
never steered by a client, and a user keeps one arm. :class:`FeedbackLedger` remembers the arm and
items of each recent request, so feedback (keyed by request id) is attributed to its arm and each
event counted once.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class FeedbackLedger:
    """What each recent request served, so feedback is attributed to its arm and counted once.

    ``request_id -> (arm, served item ids, events already counted)``, for ``ttl_s`` seconds and at most
    ``max_requests`` requests (the oldest go first): memory stays bounded whatever the traffic.
    Feedback for a forgotten request is refused like an unknown one.
    """

    def __init__(self, ttl_s: float = 3600.0, max_requests: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self._ttl_s = ttl_s
        self._max = max_requests
        self._clock = clock
        self._served: OrderedDict[str, tuple[float, str, frozenset[str], set[tuple[str, str]]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._served)

    def remember(self, request_id: str, arm: str, items: Sequence[Any]) -> None:
        """``items``: the ids served (compared as strings, as JSON clients may send either)."""
        now = self._clock()
        self._served[request_id] = (now + self._ttl_s, arm, frozenset(map(str, items)), set())
        while self._served:
            oldest = next(iter(self._served.values()))
            if len(self._served) <= self._max and oldest[0] > now:
                break
            self._served.popitem(last=False)

    def record(self, request_id: str, item_id: Any, tasks: Sequence[str]) -> tuple[str, list[str], list[str]]:
        """``(arm, tasks new for this request and item, tasks already counted)``; LookupError naming
        the request or item when the request is unknown (or expired) or did not serve the item."""
        entry = self._served.get(request_id)
        if entry is None or entry[0] <= self._clock():
            raise LookupError(f"request_id {request_id!r}: no such request served in the last {self._ttl_s:g} s")
        _, arm, items, counted = entry
        item = str(item_id)
        if item not in items:
            raise LookupError(f"item_id {item_id!r} was not served in request {request_id!r}")
        new = [t for t in tasks if (item, t) not in counted]
        counted.update((item, t) for t in new)
        return arm, new, [t for t in tasks if t not in new]


def choose_arm(key: str, traffic: Mapping[str, float]) -> str:
    """The weight arm that serves ``key``: the user id, so that a user sees one arm (a request id only
    where there is no user). A deterministic hash of the key into [0, 1) against the cumulative traffic
    shares of the arms, laid out in the order ``traffic`` lists them (shares need not sum to 1; they are
    normalised). The same key always gets the same arm, and over many keys each arm gets its share.

    The order makes the layout sticky: a policy lists its holdout first, so while the holdout's share
    stays the same its users stay in it whatever the other arms do, and a ramping candidate last, so
    the users it has keep it as its share grows (:class:`mtrec.fusion.Decision`)."""
    shares = [(arm, float(s)) for arm, s in traffic.items()]
    bad = [(a, s) for a, s in shares if not math.isfinite(s) or s < 0]
    total = sum(s for _, s in shares)
    if not shares or bad or total <= 0:
        raise ValueError(f"traffic {dict(traffic)}: shares must be finite, >= 0 and sum to more than 0")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64 * total
    cumulative = 0.0
    for arm, s in shares:
        cumulative += s
        if u < cumulative:
            return arm
    return next(a for a, s in reversed(shares) if s > 0)  # u rounded up to the total
