"""The HTTP front of the app: a FastAPI ``Ingress`` deployment (OpenAPI docs at ``/docs``).

``POST /v1/recommend`` maps the request to model indexes (:class:`mtrec.inference.Catalog`), asks the
``Embedder`` for the vectors of texts the bundle lacks (none for catalog items), the ``TaskHeads`` for
per-task predictions, picks the weight arm of the request's user (:func:`mtrec.arms.choose_arm` on
the user id: a user keeps one arm; a request without a user id would hash its request id) and ranks by the
fused score (:func:`mtrec.fusion.rank`, each task divided by the fusion scale training stored in the
bundle). ``POST /v1/score`` scores every candidate in request order.
Each recommendation counts its impressions and, per task, the sum of its items' predictions (the
predicted events the ``calibrated`` policy sets against the events) under its arm.
``POST /v1/feedback`` counts events per task and arm, once per (request, item, task); a regression
event must lie within the range of the task's labels in training. Responses name no arm and no
weights version: the arm is recorded server-side with the request, so a client cannot choose which
arm its feedback moves (operators read the weights at ``GET /v1/weights``). The weights come
from the ``WeightController``, refreshed in the background every :data:`DECISION_REFRESH_S`: the
request path never waits for it, and a controller that is down leaves the last weights in force.

Feedback ledger: each Ingress replica remembers what it served (:class:`mtrec.arms.FeedbackLedger`),
so a request's feedback must reach the replica that served it. The Ingress is light (the model work
is in the autoscaled Embedder and TaskHeads, or with ``heads_in_ingress`` the heads' forward runs here:
one hop less per request, for small CPU models) and runs as one replica; holding the ledger in the
controller instead would add a round trip to every request. With several Ingress replicas, feedback
that reaches another replica is refused with a 404.

Every client error is a 4xx with a message: malformed JSON, a wrong type, an unknown field, NaN
(422), a configured limit or a feedback value out of range (422), a body over ``max_body_bytes``
(413) or without a length (411), a bad bearer token (401), an unknown request id (404). Model-side
failures answer 503; a model call whose replica died is sent once more (to another replica) before
that. A score that is not a finite number is never answered (503): a 200 always carries numbers.

Every metric the replica records carries the app's deployment id (:func:`mtrec_serve.metrics.scope`).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at run
# time, and Serve's class-based ingress hides the module globals that string annotations need.
import asyncio
import hmac
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.serve
from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from mtrec.arms import FeedbackLedger, choose_arm
from mtrec.bundle import load_bundle
from mtrec.errors import ConfigError, DataError
from mtrec.fusion import MAIN, fuse, normalise_weights, rank
from mtrec.inference import Catalog, RequestError, Scorer, ScoreRequest
from mtrec_serve.schemas import (
    FeedbackBody,
    FeedbackResponse,
    RecommendBody,
    RecommendResponse,
    ScoreBody,
    ScoredItem,
    check_events,
    check_limits,
)

logger = logging.getLogger("ray.serve")

DECISION_REFRESH_S = 1.0
CALL_TIMEOUT_S = 30.0  # a model call slower than this answers 503
ROUTES = ("/v1/recommend", "/v1/score", "/v1/feedback", "/v1/weights", "/healthz")


@dataclass
class _Settings:
    """What the ASGI guard reads; the Ingress replica sets it from its args (one app per process)."""

    max_body_bytes: int = 2**21


SETTINGS = _Settings()
api = FastAPI(title="ray-mtrec", description="Multi-task recommendation with online score fusion.")


def _metrics() -> Any:
    import mtrec_serve.metrics

    return mtrec_serve.metrics


class _Guard:
    """ASGI middleware: refuses a body over ``SETTINGS.max_body_bytes`` (413) or a POST without a
    ``Content-Length`` (411) before anything reads it, and counts every response per route and status."""

    def __init__(self, app: Any) -> None:
        self._app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        problem = None
        if scope.get("method") == "POST" and length is None:
            problem = (411, "a Content-Length header is required")
        elif length is not None and (not length.isdigit() or int(length) > SETTINGS.max_body_bytes):
            problem = (413, f"body of {length.decode(errors='replace')} bytes; at most {SETTINGS.max_body_bytes}")
        try:
            if problem:
                await JSONResponse({"detail": problem[1]}, status_code=problem[0])(scope, receive, send_status)
            else:
                await self._app(scope, receive, send_status)
        finally:
            _metrics().record_requests(route, status)


api.add_middleware(_Guard)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    # never echo the input back: it may be huge, and NaN in it would not even serialise
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(x) for x in first["loc"] if x != "body")
    return JSONResponse({"detail": f"{where}: {first['msg']}" if where else first["msg"], "errors": errors}, 422)


@api.exception_handler(RequestError)
@api.exception_handler(DataError)
async def _unservable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, 422)


@api.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("Ingress: %s %s failed", request.method, request.url.path)
    return JSONResponse({"detail": f"the service failed to answer ({type(exc).__name__}); retry later"}, 503)


async def _model_call(method: Any, *args: Any) -> Any:
    """``method.remote(*args)`` within :data:`CALL_TIMEOUT_S`, sent once more when the replica that
    took it died: Serve's router drops a dead replica but does not resend what it had in flight, and
    the model calls are pure, so a second try on another replica is safe (a timeout is not retried)."""
    try:
        return await asyncio.wait_for(method.remote(*args), CALL_TIMEOUT_S)
    except ray.exceptions.RayActorError as e:
        logger.warning("Ingress: a model replica died during a call (%s); sending it again", type(e).__name__)
        return await asyncio.wait_for(method.remote(*args), CALL_TIMEOUT_S)


def _set_body_limit(max_bytes: int) -> None:
    """Set the guard's body limit in this process. (A function: Serve ships the Ingress class by value
    with copies of the objects it names, so the class must not assign module state itself.)"""
    SETTINGS.max_body_bytes = max_bytes


def _finite(scores: np.ndarray, arm: str) -> np.ndarray:
    """``scores``, or a 503 when one is not a finite number (JSON would carry it as null)."""
    if not np.isfinite(scores).all():
        logger.error("Ingress: fused scores not finite under arm %r: %s", arm, scores)
        raise HTTPException(503, "the model produced a score that is not a finite number; retry later")
    return scores


@ray.serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.25})
@ray.serve.ingress(api)
class Ingress:
    """See the module docstring. ``args``: :class:`mtrec_serve.app.AppArgs` as a dict."""

    def __init__(self, embedder: Any, heads: Any, controller: Any, args: dict[str, Any]) -> None:
        self._embedder, self._heads, self._controller = embedder, heads, controller
        # the heads in this replica (heads_in_ingress); else the TaskHeads deployment
        self._scorer = Scorer(load_bundle(args["bundle"])) if heads is None else None
        self._catalog = self._scorer.catalog if self._scorer is not None else Catalog.load(args["bundle"])
        self._tasks = {t.name: t for t in self._catalog.meta.tasks}
        self._label_range = self._catalog.meta.label_range
        try:
            deployment = _metrics().deployment_id(args["deployment_id"], ray.serve.get_replica_context().app_name)
        except ValueError as e:
            raise ConfigError(f"Ingress: {e}") from e
        _metrics().scope(deployment)
        self._max_candidates, self._max_text_chars = args["max_candidates"], args["max_text_chars"]
        _set_body_limit(args["max_body_bytes"])
        self._token: str | None = None
        if args.get("auth_token_env"):
            self._token = os.environ.get(args["auth_token_env"]) or None
            if self._token is None:
                raise ConfigError(f"auth_token_env: the environment variable {args['auth_token_env']!r} is not set")
        self._ledger = FeedbackLedger(args["feedback_ttl_s"], args["max_served_requests"])
        priors = normalise_weights({t: s.fusion_weight for t, s in self._tasks.items()})
        self._decision: dict[str, Any] = {"version": 0, "weights": {MAIN: priors}, "traffic": {MAIN: 1.0}}
        self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        while True:
            try:
                self._decision = await asyncio.wait_for(self._controller.decision.remote(), CALL_TIMEOUT_S)
            except Exception as e:  # the controller restarting: keep the last weights
                logger.warning("Ingress: weights not refreshed (%s); keeping version %s", e, self._decision["version"])
            await asyncio.sleep(DECISION_REFRESH_S)

    def _authorize(self, authorization: str | None) -> None:
        if self._token is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def _predict(self, request: ScoreRequest) -> tuple[dict[str, np.ndarray], float]:
        """Per-task predictions ``{task: (N,)}`` for the request's candidates, and when the work began."""
        start = time.perf_counter()
        problem = check_limits(request, self._max_candidates, self._max_text_chars)
        if problem:
            raise HTTPException(422, problem)
        indexed = self._catalog.prepare(request)
        m, t = _metrics(), time.perf_counter()
        m.observe_latency("ingress", 1000 * (t - start))
        try:
            vectors = None
            if indexed.texts:
                vectors = await _model_call(self._embedder.embed, indexed.texts)
                m.observe_latency("embed", 1000 * (time.perf_counter() - t))
            t = time.perf_counter()
            if self._scorer is not None:
                preds = self._scorer.predict([(indexed, vectors)])[0]
            else:
                preds = await _model_call(self._heads.predict, (indexed, vectors))
        except (asyncio.TimeoutError, ray.exceptions.RayError) as e:
            raise HTTPException(503, f"the model is unavailable ({type(e).__name__}); retry later") from e
        m.observe_latency("heads", 1000 * (time.perf_counter() - t))
        return preds, start

    def _arm(self, user_id: Any) -> tuple[str, str, dict[str, float]]:
        """A new request id, and the arm (with its weights) of the request's user: a sticky hash of the
        user id into the traffic shares in the order the policy lists them (holdout first, a ramping
        candidate last), so a user keeps one arm through a ramp. The id is hashed as a string (user 7
        and user "7" are one user). A request without a user id (none today: the body requires one)
        hashes its request id instead, so such requests spread over the arms one by one."""
        request_id = uuid.uuid4().hex
        key = request_id if user_id is None or user_id == "" else str(user_id)
        arm = choose_arm(key, self._decision["traffic"])
        return request_id, arm, self._decision["weights"][arm]

    @api.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(self, body: RecommendBody, authorization: str | None = Header(None)) -> RecommendResponse:
        """The ``k`` best candidates by fused score, with every task's prediction."""
        self._authorize(authorization)
        request = body.request()
        preds, start = await self._predict(request)
        t = time.perf_counter()
        request_id, arm, weights = self._arm(request.user_id)
        best, scores = rank(preds, weights, body.k, self._catalog.fusion_scales)
        scores = _finite(scores, arm)
        ids = [request.candidates[i].item_id for i in best]
        items = [
            ScoredItem(item_id=ids[n], score=float(scores[n]), predictions={k: float(v[i]) for k, v in preds.items()})
            for n, i in enumerate(best)
        ]
        self._ledger.remember(request_id, arm, ids)
        m = _metrics()
        m.record_impressions(arm, len(items))
        shown = {task: p[best] for task, p in preds.items()}
        m.record_predicted(arm, shown)  # the calibrated policy's predicted events, beside the impressions
        for task, p in shown.items():
            m.observe_predictions(task, p)
        m.observe_fused(scores)
        now = time.perf_counter()
        m.observe_latency("fuse", 1000 * (now - t))
        m.observe_latency("total", 1000 * (now - start))
        return RecommendResponse(request_id=request_id, items=items)

    @api.post("/v1/score", response_model=RecommendResponse)
    async def score(self, body: ScoreBody, authorization: str | None = Header(None)) -> RecommendResponse:
        """Every candidate in request order, with its predictions and fused score (no impression counted)."""
        self._authorize(authorization)
        request = body.request()
        preds, _ = await self._predict(request)
        request_id, arm, weights = self._arm(request.user_id)
        scores = _finite(fuse(preds, weights, self._catalog.fusion_scales), arm)
        items = [
            ScoredItem(
                item_id=c.item_id, score=float(scores[i]), predictions={k: float(v[i]) for k, v in preds.items()}
            )
            for i, c in enumerate(request.candidates)
        ]
        return RecommendResponse(request_id=request_id, items=items)

    @api.post("/v1/feedback", response_model=FeedbackResponse)
    async def feedback(self, body: FeedbackBody, authorization: str | None = Header(None)) -> FeedbackResponse:
        """Events of an item a recommendation served; each (request, item, task) counts once."""
        self._authorize(authorization)
        problem = check_events(body.events, self._tasks, self._label_range)
        if problem:
            raise HTTPException(422, problem)
        try:
            arm, new, duplicates = self._ledger.record(body.request_id, body.item_id, list(body.events))
        except LookupError as e:
            raise HTTPException(404, str(e.args[0])) from e
        m = _metrics()
        for task in new:
            m.record_feedback(task, arm, body.events[task])
        return FeedbackResponse(recorded=new, duplicates=duplicates)

    @api.get("/v1/weights")
    async def weights(self, authorization: str | None = Header(None)) -> dict[str, Any]:
        """The controller's current decision: weights per arm, traffic shares, version, reason."""
        self._authorize(authorization)
        try:
            return await asyncio.wait_for(self._controller.decision.remote(), CALL_TIMEOUT_S)
        except (asyncio.TimeoutError, ray.exceptions.RayError) as e:
            raise HTTPException(503, f"the weight controller is unavailable ({type(e).__name__})") from e

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness, the tasks served and the version of the weights in force."""
        return {
            "status": "ok",
            "tasks": list(self._tasks),
            "weights_version": self._decision["version"],
            "served_requests_remembered": len(self._ledger),
        }
