"""Fuzzing a running service's HTTP API, for the reliability tests and the soak benchmark (dev-only:
schemathesis and hypothesis are not dependencies of the shipped package).

- :func:`fuzz_api`: property-based requests generated from the service's own ``/openapi.json``
  (schemathesis, valid and invalid bodies; :func:`steer` narrows them to bodies the model can serve)
  plus :func:`hostile_requests` (oversized bodies, candidate lists and texts, NaN and infinities in raw
  JSON, unknown tasks, deep nesting...): every answer must be below 500, in time, and a 4xx must carry
  a message (:class:`FuzzReport`);
- :func:`send`: one raw HTTP call, answered or not.

Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FuzzReport:
    """Every answer of a fuzz run: statuses, and the answers that break the API's promises."""

    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # 5xx, or no answer at all
    slow: list[str] = field(default_factory=list)  # answered after the latency bound
    no_message: list[str] = field(default_factory=list)  # 4xx without a JSON "detail"
    max_latency_s: float = 0.0
    unsatisfiable: list[str] = field(default_factory=list)  # operation and mode with no case to generate

    def check(self, what: str, status: int, body: bytes, seconds: float, bound_s: float) -> None:
        self.cases += 1
        self.statuses[status] += 1
        self.max_latency_s = max(self.max_latency_s, seconds)
        if status >= 500 or status < 0:
            self.server_errors.append(f"{what}: {status} {body[:200]!r}")
        if seconds > bound_s:
            self.slow.append(f"{what}: {seconds:.1f} s")
        if 400 <= status < 500 and not _detail(body):
            self.no_message.append(f"{what}: {status} {body[:200]!r}")

    def summary(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "5xx": len(self.server_errors),
            "slow": len(self.slow),
            "4xx_without_message": len(self.no_message),
            "max_latency_s": round(self.max_latency_s, 3),
            "not_generated": self.unsatisfiable,
            "examples": (self.server_errors + self.slow + self.no_message)[:10],
        }


def _detail(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    return str(doc.get("detail") or "") if isinstance(doc, dict) else ""


def send(url: str, method: str, raw: Raw, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes, float]:
    """(status, body, seconds) of one HTTP call; status -1 when no answer came (the body says why)."""
    data = iter(raw) if isinstance(raw, list) else raw
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, r.read(), time.perf_counter() - start
    except urllib.error.HTTPError as e:
        return e.code, e.read(), time.perf_counter() - start
    except (OSError, ValueError) as e:
        return -1, f"{type(e).__name__}: {e}".encode(), time.perf_counter() - start


Raw = bytes | list[bytes] | None  # a body; a list is sent in chunks, without a Content-Length


def hostile_requests(items: list[Any], limits: dict[str, int]) -> list[tuple[str, str, str, Raw]]:
    """Hand-written hostile requests: ``(what, method, path, raw body)``. ``items``: a few catalog ids;
    ``limits``: the app's ``max_candidates``, ``max_text_chars`` and ``max_body_bytes``."""
    ok = {"user_id": 1, "candidates": items[:5]}
    n, chars, size = limits["max_candidates"], limits["max_text_chars"], limits["max_body_bytes"]
    j = lambda d: json.dumps(d).encode()  # noqa: E731
    cases = [
        ("body over the byte limit", "/v1/score", j({**ok, "context": "x" * (size + 10)})),
        ("candidates over the limit", "/v1/recommend", j({**ok, "candidates": list(range(10**6, 10**6 + n + 1))})),
        ("text over the limit", "/v1/score", j({**ok, "candidates": [{"item_id": "cold", "text": "t" * (chars + 1)}]})),
        ("context over the limit", "/v1/recommend", j({**ok, "context": "c" * (chars + 1)})),
        ("history over the limit", "/v1/recommend", j({**ok, "history": list(range(1001))})),
        ("empty candidates", "/v1/recommend", j({**ok, "candidates": []})),
        ("huge k", "/v1/recommend", j({**ok, "k": 10**12})),
        ("huge user id", "/v1/recommend", j({**ok, "user_id": 10**30})),
        ("huge item id", "/v1/score", j({**ok, "candidates": [{"item_id": -(10**30), "text": "a cold item"}]})),
        ("huge history id", "/v1/score", j({**ok, "history": [10**40]})),
        ("huge feature", "/v1/score", j({**ok, "candidates": [{"item_id": items[0], "features": {"discount": 1e308}}]})),
        ("empty text", "/v1/score", j({**ok, "candidates": [{"item_id": "cold", "text": ""}]})),
        ("whitespace text", "/v1/score", j({**ok, "candidates": [{"item_id": "cold", "text": " \n\t "}]})),
        ("control characters", "/v1/score", j({**ok, "candidates": [{"item_id": "c\x00", "text": "\x00\x01\ud800"}]})),
        ("NaN", "/v1/score", b'{"user_id": 1, "candidates": [{"item_id": 1, "features": {"discount": NaN}}]}'),
        ("Infinity", "/v1/score", b'{"user_id": 1, "candidates": [{"item_id": 1, "features": {"discount": Infinity}}]}'),
        ("-Infinity in user features", "/v1/recommend", b'{"user_id": 1, "candidates": [1], "user_features": {"age": -Infinity}}'),
        ("1e999 overflows to infinity", "/v1/score", b'{"user_id": 1, "candidates": [{"item_id": 1, "features": {"discount": 1e999}}]}'),
        ("NaN feedback value", "/v1/feedback", b'{"request_id": "r", "item_id": 1, "events": {"click": NaN}}'),
        ("unknown task", "/v1/feedback", j({"request_id": "r", "item_id": 1, "events": {"no_such_task": 1}})),
        ("deep nesting", "/v1/recommend", b'{"user_id": 1, "candidates": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("not UTF-8", "/v1/recommend", b'{"user_id": "\xff\xfe", "candidates": [1]}'),
        ("not JSON", "/v1/recommend", b"user_id=1&candidates=1"),
        ("a JSON list", "/v1/recommend", b"[1, 2, 3]"),
        ("JSON null", "/v1/feedback", b"null"),
        ("empty body", "/v1/recommend", b""),
        ("duplicate keys", "/v1/recommend", b'{"user_id": 1, "user_id": {"a": 1}, "candidates": [1]}'),
    ]  # fmt: skip
    return [(what, "POST", path, raw) for what, path, raw in cases] + [
        ("GET on a POST route", "GET", "/v1/recommend", None),
        ("unknown route", "GET", "/v1/nothing-here", None),
        ("POST without a body", "POST", "/v1/feedback", None),
        ("chunked body without a length", "POST", "/v1/recommend", [json.dumps(ok).encode()]),
    ]


def fuzz_api(
    base_url: str,
    token: str | None = None,
    *,
    examples: int = 20,
    hostile: list[tuple[str, str, str, Raw]] = (),
    catalog: tuple[list[Any], list[str], int] | None = None,
    bound_s: float = 10.0,
    seed: int = 0,
) -> FuzzReport:
    """Send ``examples`` generated requests per operation and generation mode (schemathesis: bodies
    valid per the schema, and invalid ones), then the ``hostile`` requests; check every answer
    (:meth:`FuzzReport.check`). ``token``: the bearer token, sent with every generated request so that
    the bodies reach the handlers (the token checks are tests of their own). ``catalog``: (item ids,
    task names, max candidates) of the app, to also fuzz with :func:`steer`'s servable bodies."""
    import schemathesis
    from schemathesis import GenerationMode

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(base_url + "/openapi.json", timeout=bound_s) as r:
        spec = json.loads(r.read())
    report = FuzzReport()
    runs = [("", spec, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE))]
    if catalog is not None:
        runs.append(("steered ", steer(spec, *catalog), (GenerationMode.POSITIVE,)))
    for label, doc, modes in runs:
        schema = schemathesis.openapi.from_dict(doc)
        _fuzz_schema(schema, label, modes, base_url, headers, examples, bound_s, seed, report)
    base_headers = {"Content-Type": "application/json", **headers}
    for what, method, path, raw in hostile:
        status, body, seconds = send(base_url + path, method, raw, base_headers, bound_s + 5)
        report.check(f"{what} ({method} {path})", status, body, seconds, bound_s)
    return report


def steer(spec: dict[str, Any], items: list[Any], tasks: list[str], max_candidates: int) -> dict[str, Any]:
    """A copy of the OpenAPI ``spec`` whose bodies the model can serve: candidates are catalog ids or new
    ``cold-*`` ids with a text, histories hold catalog ids, events name the app's tasks, no side
    features. Random bodies of the plain schema mostly stop at validation; these reach the model
    (random texts through the Embedder, cold ids, histories, fusion)."""
    out = json.loads(json.dumps(spec))
    schemas = out["components"]["schemas"]
    cold = {
        "type": "object",
        "properties": {"item_id": {"type": "string", "pattern": "^cold-[a-z0-9]{1,12}$"}, "text": {"type": "string", "minLength": 1}},
        "required": ["item_id", "text"],
        "additionalProperties": False,
    }  # fmt: skip
    known = {"enum": list(items)}
    for name in ("ScoreBody", "RecommendBody"):
        props = schemas[name]["properties"]
        props["candidates"] = {
            "type": "array",
            "minItems": 1,
            "maxItems": max_candidates,
            "items": {"anyOf": [known, cold]},
        }
        props["history"] = {"type": "array", "maxItems": 20, "items": known}
        props["user_features"] = {"type": "object", "maxProperties": 0}
    schemas["FeedbackBody"]["properties"]["events"]["propertyNames"] = {"enum": list(tasks)}
    return out


def _fuzz_schema(
    schema: Any,
    label: str,
    modes: tuple[Any, ...],
    base_url: str,
    headers: dict[str, str],
    examples: int,
    bound_s: float,
    seed: int,
    report: FuzzReport,
) -> None:
    import hypothesis

    settings = hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        phases=[hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in modes:
            strategy = operation.as_strategy(generation_mode=mode, headers=headers)
            run = _property(strategy, label + mode.value, base_url, headers, bound_s, report)
            try:
                hypothesis.seed(seed)(settings(run))()
            except hypothesis.errors.Unsatisfiable:  # nothing invalid to send (e.g. GET /healthz)
                report.unsatisfiable.append(f"{label}{mode.value} {operation.method.upper()} {operation.path}")


def _property(
    strategy: Any, mode: str, base_url: str, headers: dict[str, str], bound_s: float, report: FuzzReport
) -> Callable[[], None]:
    """A hypothesis test that sends each generated case and checks its answer."""
    import hypothesis

    @hypothesis.given(case=strategy)
    def run(case: Any) -> None:
        start = time.perf_counter()
        try:
            response = case.call(base_url=base_url, headers=headers, timeout=bound_s + 5)
            status, body = response.status_code, response.content
        except Exception as e:  # a dropped connection or a timeout: no answer is a failure too
            status, body = -1, f"{type(e).__name__}: {e}".encode()
        what = f"{mode} {case.method} {case.path} body={str(case.body)[:300]}"
        report.check(what, status, body, time.perf_counter() - start, bound_s)

    return run
