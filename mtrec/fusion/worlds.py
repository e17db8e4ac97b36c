"""Semi-synthetic worlds that tell fusion-weight policies apart, shaped by statistics of real logs.

A world (:class:`~mtrec.fusion.simulator.World`) is a pool of requests, each with ``CANDIDATES``
candidates, the true probability of every task for each, the served model's estimates, a position
bias, the north-star values, a guardrail, the static fusion weights, and a shift half way through.
``build_world(name, seed)`` draws one; the name picks the shift, the seed everything random.

**Where the response structure comes from.** :class:`LogStats` holds four numbers computed once from
MovieLens-100K by :meth:`LogStats.from_movielens` (stored in :data:`MOVIELENS_100K`; a unit test
recomputes them from ``shared/data/ml-100k`` when it is there). Over the movies with at least 20
ratings (those a retrieval stage would offer): ``item_sd`` is the spread (std) of the logit of the
share of users who rated a movie, the attraction of an item; ``quality_sd`` is the spread of the
logit of P(rating >= 4 | rated), what happens after the click; ``corr`` is their correlation; and
``user_sd`` is the spread of the logit of the share of movies each user rated, how active a user
is. Each std has the binomial noise of its estimate subtracted, and ``corr`` is corrected for it.
The Ali-CCP and AliExpress samples here (100 rows each) are too small to estimate anything; the
rates come from the ranges the literature reports for such logs (click-through 1-5 %, conversions
0.1-1 % per impression), set by the intercepts below.

**A request** is one user: a user effect ``u ~ N(0, user_sd^2)``; each candidate an attraction
``x`` and post-click qualities ``y1, y2`` with sds ``item_sd, quality_sd, quality_sd``, ``corr(x, y)
= corr`` and ``corr(y1, y2) = Y_CORR`` (an assumption: the logs hold one post-click signal). In the
e-commerce funnel ``click -> add_to_cart -> purchase``::

    logit p(click)                   = BASE_CLICK + u + x
    logit p(add_to_cart | click)     = BASE_CART + y1
    logit p(purchase | add_to_cart)  = BASE_PURCHASE + y2

**The served model** errs per task on the logit of each conditional probability: an offset (the
miscalibration, uniform in ``+-MISCALIBRATION`` per task and seed), a slope (uniform in ``SLOPE``,
over- or under-confident about its own spread) and Gaussian noise of std ``MODEL_NOISE`` (what it
never learnt), chained back to the full space as ESMM does. **Position bias**: a user looks at slot
``j`` (1-based) with probability ``1 / j`` (Joachims, Swaminathan & Schnabel 2017). **The static
weights** rank by the model's own expected value: ``w_t`` proportional to ``values_t * scale_t``,
which is the best ranking when the model is calibrated, so the gap to the oracle comes from the
model's errors, the guardrail and the shift. **The north star** values a click at 8 and a purchase
at 30 (add-to-cart is predicted and valued by nobody), so clicks and purchases weigh about alike:
where one task carries the whole value, any weight that favours it is near the best and no policy
can be told apart from another. A miscalibration of up to ``exp(1.1)``, about 3x, is what negative
sampling and delayed conversions leave in production models (He et al. 2014; Chapelle 2014).
**Guardrail**: the click rate stays at least 0.98 of the holdout's.

The worlds (:data:`WORLDS`):

- ``step``: half way, shoppers convert more (add-to-cart and purchase logits +0.6) and click a
  little less (-0.2): a sale.
- ``drift``: the same change, reached gradually in 8 steps over a quarter of the run.
- ``retrain``: half way the model is retrained: a fresh miscalibration and fresh noise; users stay.
- ``reversal``: half way, what made a shopper who carted an item buy it now puts them off (the sign
  of ``y2`` in p(purchase | add_to_cart) flips, and buying rises as in ``step``: a clearance sale).
  The model still ranks by the old signal, so the best purchase weight falls from above the static
  one to below it.
- ``conflict``: ads against purchases. Tasks ``click -> purchase`` and ``click -> ad`` (a click on a
  sponsored item, 30 % of the candidates, is paid); sponsored items attract less (``x - 0.5``) and
  sell less (``y - 0.5``). The north star values an ad click at 6 and a purchase at 30; the static
  weights were set when an ad click was worth 3, by a calibrated model. Pushing ads raises the value
  until the click guardrail binds. Half way, advertisers target better: sponsored items attract
  more (``x + 0.4``), and the best weights push ads further, to the guardrail again.
- ``null``: every candidate of a request has the same truth (each task at the mean of the request's
  ``SHOWN`` best, the rates a good ranking would serve), so no ranking, and no weight, changes the
  value or the clicks; the model still errs. Half way, conversions rise as in ``step``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtrec.errors import ConfigError
from mtrec.fusion.score import fit_scales
from mtrec.fusion.simulator import Phase, World, chain

REQUESTS, CANDIDATES, SHOWN = 2000, 50, 5
Y_CORR = 0.5
BASE_CLICK, BASE_CART, BASE_PURCHASE = -4.6, -2.2, -1.0  # logits; served rates in the ranges above
MISCALIBRATION, SLOPE, MODEL_NOISE = 1.1, (0.8, 1.2), 0.5
VALUES = {"click": 8.0, "purchase": 30.0}
GUARDRAILS = {"click": 0.98}
FUNNEL, FUNNEL_PARENTS = ["click", "add_to_cart", "purchase"], [-1, 0, 1]
SALE = np.array([-0.2, 0.6, 0.6])  # the step's change of each funnel logit
SPONSORED, AD_VALUE, AD_VALUE_THEN = 0.3, 6.0, 3.0
_DRIFT_STEPS, _DRIFT_SPAN = 8, 0.25


@dataclass(frozen=True)
class LogStats:
    """The response structure taken from real logs; see the module docstring."""

    item_sd: float
    quality_sd: float
    corr: float
    user_sd: float

    @classmethod
    def from_movielens(cls, folder: str | Path, min_ratings: int = 20) -> LogStats:
        """From MovieLens-100K's ``u.data`` (user, item, rating, timestamp per line, tab separated)."""
        data = np.loadtxt(Path(folder) / "u.data", dtype=np.int64)
        user, item, rating = data[:, 0], data[:, 1], data[:, 2]
        users, items = int(user.max()), int(item.max())
        rated = np.bincount(item, minlength=items + 1)[1:]
        liked = np.bincount(item, weights=rating >= 4, minlength=items + 1)[1:]
        keep = rated >= min_ratings
        reach = rated[keep] / users
        like = (liked[keep] + 0.5) / (rated[keep] + 1.0)
        x, y = _logit(reach), _logit(like)
        noise_x = np.mean(1 / (users * reach * (1 - reach)))  # variance of a binomial share's logit
        noise_y = np.mean(1 / (rated[keep] * like * (1 - like)))
        sx, sy = np.sqrt(x.var() - noise_x), np.sqrt(y.var() - noise_y)
        activity = np.bincount(user, minlength=users + 1)[1:] / items
        su = np.sqrt(_logit(activity).var() - np.mean(1 / (items * activity * (1 - activity))))
        return cls(float(sx), float(sy), float(np.cov(x, y)[0, 1] / (sx * sy)), float(su))


MOVIELENS_100K = LogStats(item_sd=0.876, quality_sd=0.893, corr=0.487, user_sd=0.929)


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _latents(stats: LogStats, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(user (Q, 1), latent (Q, K, 3))``: the user effect and each candidate's ``x, y1, y2``."""
    sd = np.array([stats.item_sd, stats.quality_sd, stats.quality_sd])
    corr = np.array([[1.0, stats.corr, stats.corr], [stats.corr, 1.0, Y_CORR], [stats.corr, Y_CORR, 1.0]])
    cov = corr * np.outer(sd, sd)
    latent = rng.multivariate_normal(np.zeros(3), cov, size=(REQUESTS, CANDIDATES))
    return rng.normal(0.0, stats.user_sd, (REQUESTS, 1)), latent


def _model(
    cond_logits: np.ndarray,
    parents: list[int],
    rng: np.random.Generator,
    exact: Sequence[int] = (),
    miscalibration: float = MISCALIBRATION,
) -> np.ndarray:
    """``(Q, K, T)``: a served model's full-space estimates from the true conditional logits (see the
    module docstring); the tasks in ``exact`` it knows exactly."""
    t = cond_logits.shape[-1]
    offset = rng.uniform(-miscalibration, miscalibration, t)
    slope = rng.uniform(*SLOPE, t)
    mean = cond_logits.mean(axis=(0, 1))
    est = mean + slope * (cond_logits - mean) + offset + rng.normal(0.0, MODEL_NOISE, cond_logits.shape)
    est[..., list(exact)] = cond_logits[..., list(exact)]
    return chain(_sigmoid(est), parents)


def _phase(truth_logits: np.ndarray, estimate: np.ndarray, parents: list[int], tasks: list[str]) -> Phase:
    return Phase(
        chain(_sigmoid(truth_logits), parents), estimate, fit_scales(dict(zip(tasks, np.moveaxis(estimate, -1, 0))))
    )


def _world(
    name: str,
    tasks: list[str],
    parents: list[int],
    values: dict[str, float],
    phases: list[Phase],
    starts: list[float],
    prior_values: dict[str, float] | None = None,
) -> World:
    """A world whose static weights rank by the first phase's model's expected value under ``prior_values``."""
    scales = phases[0].scales
    prior_values = prior_values or values
    prior = {t: prior_values.get(t, 0.0) * scales[t] for t in tasks}
    examination = 1.0 / np.arange(1, SHOWN + 1)
    return World(name, tasks, parents, dict(values), dict(GUARDRAILS), prior, examination, phases, starts)


def _funnel(seed: int, stats: LogStats, flat: bool = False) -> tuple[np.ndarray, np.random.Generator]:
    """``(Q, K, 3)`` true conditional logits of the funnel, and the generator to go on drawing with.
    ``flat``: every candidate of a request gets the same truth (no ranking matters)."""
    rng = np.random.default_rng([seed, 16])
    user, latent = _latents(stats, rng)
    logits = np.stack(
        [BASE_CLICK + user + latent[..., 0], BASE_CART + latent[..., 1], BASE_PURCHASE + latent[..., 2]], axis=-1
    )
    if flat:  # each task at the mean of the request's SHOWN best: the rates a good ranking would serve
        best = -np.sort(-logits, axis=1)[:, :SHOWN].mean(axis=1, keepdims=True)
        logits = np.broadcast_to(best, logits.shape).copy()
    return logits, rng


def _shifted(kind: str, seed: int, stats: LogStats) -> World:
    """A funnel world whose second half differs by ``kind``: step, drift, retrain or reversal."""
    logits, rng = _funnel(seed, stats)
    model = _model(logits, FUNNEL_PARENTS, rng)
    starts = [0.0, 0.5]
    if kind == "reversal":  # what made a shopper buy now puts them off: the purchase signal flips
        reversed_ = logits.copy()
        reversed_[..., 2] = 2 * BASE_PURCHASE - logits[..., 2] + SALE[2]
        truths = [logits, reversed_]
    elif kind == "drift":
        truths = [logits + SALE * (i / _DRIFT_STEPS) for i in range(_DRIFT_STEPS + 1)]
        starts += [0.5 + _DRIFT_SPAN * i / _DRIFT_STEPS for i in range(1, _DRIFT_STEPS)]
    else:
        truths = [logits, logits + SALE if kind == "step" else logits]
    phases = [_phase(t, model, FUNNEL_PARENTS, FUNNEL) for t in truths]
    if kind == "retrain":  # a new model, swapped in under the same serving configuration (its scales)
        retrained = _model(logits, FUNNEL_PARENTS, rng)
        phases[1] = Phase(phases[1].truth, retrained, phases[0].scales)
    return _world(kind, FUNNEL, FUNNEL_PARENTS, VALUES, phases, starts)


def _conflict(seed: int, stats: LogStats) -> World:
    rng = np.random.default_rng([seed, 17])
    user, latent = _latents(stats, rng)
    sponsored = rng.random((REQUESTS, CANDIDATES)) < SPONSORED
    x = latent[..., 0] - 0.5 * sponsored
    y = latent[..., 1] - 0.5 * sponsored
    paid = np.where(sponsored, 20.0, -20.0)  # logit of p(ad | click): 1 for a sponsored item, 0 otherwise
    tasks, parents = ["click", "purchase", "ad"], [-1, 0, 0]
    logits = np.stack([BASE_CLICK + user + x, BASE_CART + BASE_PURCHASE + y, paid], axis=-1)
    model = _model(logits, parents, rng, exact=[2], miscalibration=0.0)
    relevant = logits.copy()
    relevant[..., 0] += 0.4 * sponsored
    values = {"purchase": VALUES["purchase"], "ad": AD_VALUE}
    phases = [_phase(logits, model, parents, tasks), _phase(relevant, model, parents, tasks)]
    return _world("conflict", tasks, parents, values, phases, [0.0, 0.5], values | {"ad": AD_VALUE_THEN})


def _null(seed: int, stats: LogStats) -> World:
    logits, rng = _funnel(seed, stats, flat=True)
    model = _model(logits, FUNNEL_PARENTS, rng)
    phases = [_phase(logits, model, FUNNEL_PARENTS, FUNNEL), _phase(logits + SALE, model, FUNNEL_PARENTS, FUNNEL)]
    return _world("null", FUNNEL, FUNNEL_PARENTS, VALUES, phases, [0.0, 0.5])


WORLDS: dict[str, Callable[[int, LogStats], World]] = {
    "step": lambda seed, stats: _shifted("step", seed, stats),
    "drift": lambda seed, stats: _shifted("drift", seed, stats),
    "retrain": lambda seed, stats: _shifted("retrain", seed, stats),
    "reversal": lambda seed, stats: _shifted("reversal", seed, stats),
    "conflict": _conflict,
    "null": _null,
}
NULL_WORLDS = ("null",)  # worlds where no weight changes the value


def build_world(name: str, seed: int, stats: LogStats = MOVIELENS_100K) -> World:
    """World ``name`` of :data:`WORLDS`, drawn with ``seed``; ConfigError listing the names otherwise."""
    if name not in WORLDS:
        raise ConfigError(f"unknown world {name!r}; valid worlds: {', '.join(WORLDS)}")
    return WORLDS[name](seed, stats)
