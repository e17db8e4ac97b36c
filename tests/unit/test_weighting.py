"""Weighting strategies, each on a toy problem that shows its defining behaviour."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from mtrec.config import TaskSpec
from mtrec.errors import ConfigError
from mtrec.weighting import WEIGHTINGS, StepContext, Weighting, build_weighting, project_conflicting
from mtrec.weighting.common import step_generator

TASKS = [
    TaskSpec("click", loss_weight=1.0),
    TaskSpec("watch", kind="regression", loss_weight=0.5),
    TaskSpec("buy", loss_weight=2.0),
]


class SharedBottom(nn.Module):
    """``x (B, 4)`` -> ``(B, T)``: a two-layer shared bottom and one linear head per task."""

    def __init__(self, num_tasks: int = 3) -> None:
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(num_tasks))

    def forward(self, x: Tensor) -> Tensor:
        h = self.bottom(x)
        return torch.cat([head(h) for head in self.heads], dim=1)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These toys are tiny: extra threads only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _losses(model: SharedBottom, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g)
    y = torch.randn(16, 3, generator=g)
    return ((model(x) - y) ** 2).mean(dim=0)


def test_registry_and_errors() -> None:
    assert list(WEIGHTINGS) == ["static", "uncertainty", "dwa", "gradnorm", "rlw", "famo", "pcgrad"]
    for name, cls in WEIGHTINGS.items():
        w = build_weighting(name, TASKS)
        assert isinstance(w, cls) and w.name == name and w.num_tasks == 3
    assert WEIGHTINGS["pcgrad"].needs_shared_grads and WEIGHTINGS["gradnorm"].needs_shared_grads
    with pytest.raises(ConfigError, match="unknown weighting 'nash'; valid weightings: static, uncertainty"):
        build_weighting("nash", TASKS)
    with pytest.raises(ConfigError, match="'gradnorm': unknown parameter 'temperature'; valid parameters: alpha, lr"):
        build_weighting("gradnorm", TASKS, temperature=2.0)
    with pytest.raises(ConfigError, match="'static': unknown parameter 'like'; valid parameters: click, watch, buy"):
        build_weighting("static", TASKS, like=1.0)
    with pytest.raises(ConfigError, match="'temperature' must be a positive number, got -1"):
        build_weighting("dwa", TASKS, temperature=-1)
    with pytest.raises(ConfigError, match="'all_shared' must be 0"):
        build_weighting("gradnorm", TASKS, all_shared=0.5)


def test_static_reproduces_priors_and_overrides() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0])
    loss, w = build_weighting("static", TASKS)(losses, StepContext())
    assert w.tolist() == [1.0, 0.5, 2.0] and loss.item() == pytest.approx(1 + 1 + 6)
    _, w = build_weighting("static", TASKS, buy=4, click=0)(losses, StepContext())
    assert w.tolist() == [0.0, 0.5, 4.0]


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_unobserved_task_contributes_nothing(name: str) -> None:
    torch.manual_seed(0)
    model = SharedBottom()
    weighting = build_weighting(name, TASKS)
    observed = torch.tensor([True, False, True])
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)  # e.g. a frozen encoder layer: skipped
    for step in range(3):
        ctx = StepContext(shared_params=[*model.bottom.parameters(), frozen], observed=observed, step=step)
        loss, weights = weighting(_losses(model, step), ctx)
        grads = torch.autograd.grad(loss, list(model.heads[1].parameters()) + list(weighting.parameters()))
        assert all(g.abs().sum() == 0 for g in grads[:2]), "the unobserved head got a gradient"
        if name == "uncertainty":
            assert grads[2][1] == 0 and grads[2][0] != 0
        assert torch.isfinite(weights).all() and (weights >= 0).all()
        weighting.end_epoch(torch.tensor([1.0 / (step + 1), math.nan, 2.0 / (step + 1)]))
    # the unobserved task's state never moved
    state = dict(weighting.named_buffers())
    if name == "gradnorm":
        assert state["_weights"][1] == 1.0 and state["_weights"].sum().item() == pytest.approx(3.0)
    if name == "famo":
        assert state["_logits"][1] == 0.0 and state["_logits"][0] != 0.0
    if name == "dwa":
        assert torch.isnan(state["_history"][:, 1]).all()
    # a NaN loss of an unobserved task does not reach the scalar
    nan_losses = torch.tensor([1.0, math.nan, 2.0])
    loss, _ = weighting(nan_losses, StepContext(observed=observed, step=9))
    assert torch.isfinite(loss)


def _toy_grads(g1: list[float], g2: list[float]) -> tuple[Tensor, Tensor, nn.Parameter, nn.Parameter]:
    """Two tasks with shared gradients ``g1``, ``g2`` on theta (linear losses) and one head each."""
    theta = nn.Parameter(torch.zeros(2))
    heads = nn.Parameter(torch.tensor([0.5, -1.0]))
    losses = torch.stack([torch.tensor(g1) @ theta, torch.tensor(g2) @ theta]) + (heads - 1.0) ** 2
    weighting = build_weighting("pcgrad", [TaskSpec("a"), TaskSpec("b")])
    loss, _ = weighting(losses, StepContext(shared_params=[theta]))
    loss.backward()
    return theta.grad, heads.grad, theta, heads


def test_pcgrad_removes_the_conflicting_component() -> None:
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # obtuse: g1 . g2 = -1
    theta_grad, head_grad, _, _ = _toy_grads(g1.tolist(), g2.tolist())
    # g1 -> g1 - (g1.g2/|g2|^2) g2 = (0.5, 0.5); g2 -> g2 - (g2.g1/|g1|^2) g1 = (0, 1)
    assert theta_grad.tolist() == pytest.approx([0.5, 1.5])
    assert theta_grad @ g1 >= 0 and theta_grad @ g2 >= 0
    assert (g1 + g2) @ g2 > 0 and (g1 + g2) @ g1 == 0  # the plain sum has no such guarantee in general
    assert head_grad.tolist() == pytest.approx([-1.0, -4.0])  # plain gradient of (h - 1)^2


def test_pcgrad_without_conflict_is_the_plain_sum() -> None:
    theta_grad, _, _, _ = _toy_grads([1.0, 0.0], [1.0, 1.0])
    assert theta_grad.tolist() == pytest.approx([2.0, 1.0])


def test_pcgrad_surrogate_gradient_on_a_network() -> None:
    torch.manual_seed(1)
    model = SharedBottom()
    with torch.no_grad():  # task 1 predicts minus what task 0 predicts, for the same target: conflict
        model.heads[1].weight.copy_(-model.heads[0].weight)
    shared = list(model.bottom.parameters())
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    losses = ((model(x) - x[:, :1]) ** 2).mean(dim=0)
    prior = torch.tensor([t.loss_weight for t in TASKS])
    per_task = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(prior[t] * losses[t], shared, retain_graph=True)])
            for t in range(3)
        ]
    )
    expected_shared = project_conflicting(per_task, step_generator(7, 5))
    plain_heads = torch.autograd.grad((prior * losses).sum(), list(model.heads.parameters()), retain_graph=True)
    loss, weights = build_weighting("pcgrad", TASKS, seed=7)(losses, StepContext(shared_params=shared, step=5))
    assert loss.item() == pytest.approx((prior * losses).sum().item())  # reads as the weighted loss
    loss.backward()
    assert weights.tolist() == [1.0, 0.5, 2.0]
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.allclose(got, expected_shared, atol=1e-6)
    assert not torch.allclose(got, per_task.sum(0), atol=1e-4), "toy has no conflict: the test proves nothing"
    for g, p in zip(plain_heads, model.heads.parameters()):
        assert torch.allclose(p.grad, g, atol=1e-6)
    for t in range(3):  # the projected gradient does not conflict with any task's own gradient
        assert got @ per_task[t] >= -1e-6


def test_pcgrad_task_order_is_a_function_of_seed_and_step() -> None:
    grads = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    grads[1] = -grads[0] + 0.1 * grads[2]  # conflicts, so the visiting order matters
    a = project_conflicting(grads, step_generator(0, 3))
    assert torch.equal(a, project_conflicting(grads, step_generator(0, 3)))
    others = [project_conflicting(grads, step_generator(0, s)) for s in range(20)]
    assert any(not torch.allclose(a, o) for o in others)


def _gradnorm_toy_ratio(alpha: float, steps: int) -> tuple[float, float, Weighting]:
    """Two tasks on a fixed shared vector: gradient scales 1 and 100; task b's loss falls to 1/4 of its
    start, task a's stays. Returns (initial, final) ratio G_a / G_b of weighted gradient norms."""
    w_shared = nn.Parameter(torch.tensor([0.6, -0.8]))
    weighting = build_weighting("gradnorm", [TaskSpec("a"), TaskSpec("b")], alpha=alpha, lr=0.05)
    ratios = []
    for step in range(steps):
        k_b = 1.0 if step == 0 else 0.25
        sq = (w_shared**2).sum()
        losses = torch.stack([1.0 * sq, 100.0 * k_b * sq])
        _, weights = weighting(losses, StepContext(shared_params=[w_shared], step=step))
        norms = torch.tensor([2.0, 200.0 * k_b]) * w_shared.detach().norm()
        g = weights * norms
        ratios.append((g[0] / g[1]).item())
    return ratios[1], ratios[-1], weighting


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_gradnorm_moves_gradient_norm_ratio_to_its_target(alpha: float) -> None:
    # inverse training rates: Ltilde = (1, 0.25), r = (1.6, 0.4) -> target G_a / G_b = 4 ** alpha
    first, last, weighting = _gradnorm_toy_ratio(alpha, steps=300)
    target = 4.0**alpha
    assert abs(math.log(first / target)) > 2.0  # equal weights: G_a / G_b = 1 / 25
    assert abs(math.log(last / target)) < 0.15
    weights = dict(weighting.named_buffers())["_weights"]
    assert weights.sum().item() == pytest.approx(2.0) and (weights > 0).all()


def test_uncertainty_learns_the_noise_ratio() -> None:
    # two regression targets with noise std 1 and 4: exp(log_var) -> MSE -> 1 and 16
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 3, generator=g)
    y = torch.stack([x @ torch.tensor([1.0, -2.0, 0.5]), x @ torch.tensor([0.3, 1.0, 2.0])], 1)
    y = y + torch.randn(4096, 2, generator=g) * torch.tensor([1.0, 4.0])
    model = nn.Linear(3, 2)
    weighting = build_weighting("uncertainty", [TaskSpec("a", kind="regression"), TaskSpec("b", kind="regression")])
    opt = torch.optim.Adam(list(model.parameters()) + list(weighting.parameters()), lr=0.05)
    for step in range(400):
        losses = ((model(x) - y) ** 2).mean(0)
        loss, _ = weighting(losses, StepContext(step=step))
        opt.zero_grad()
        loss.backward()
        weighting.after_backward()
        opt.step()
    variances = weighting.log_var.detach().exp()
    assert variances[1] / variances[0] == pytest.approx(16.0, rel=0.1)
    assert variances.tolist() == pytest.approx(losses.detach().tolist(), rel=0.05)  # exp(s) = L at the optimum
    _, weights = weighting(losses, StepContext())
    assert weights.tolist() == pytest.approx((0.5 / variances).tolist())


def test_uncertainty_binary_form() -> None:
    w = build_weighting(
        "uncertainty", [TaskSpec("click"), TaskSpec("watch", kind="regression")], init_log_var=math.log(2)
    )
    loss, weights = w(torch.tensor([1.0, 1.0]), StepContext())
    assert weights.tolist() == pytest.approx([0.5, 0.25])
    assert loss.item() == pytest.approx(0.5 + 0.25 + math.log(2))  # each adds 0.5 * log(2)


def test_dwa_weights_positive_normalised_and_favour_slow_tasks() -> None:
    dwa = build_weighting("dwa", TASKS, temperature=2.0)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(30):
        _, w = dwa(torch.rand(3, generator=gen), StepContext(epoch=epoch))
        if epoch < 2:
            assert w.tolist() == [1.0, 1.0, 1.0]
        assert (w > 0).all() and w.sum().item() == pytest.approx(3.0)
        dwa.end_epoch(torch.rand(3, generator=gen) + 0.01)
    dwa = build_weighting("dwa", TASKS, temperature=2.0)
    dwa.end_epoch(torch.tensor([1.0, 1.0, 1.0]))
    dwa.end_epoch(torch.tensor([0.5, 1.0, 1.5]))  # ratios 0.5, 1, 1.5
    _, w = dwa(torch.ones(3), StepContext())
    expected = 3 * torch.softmax(torch.tensor([0.5, 1.0, 1.5]) / 2.0, 0)
    assert torch.allclose(w, expected)


def test_famo_weights_positive_normalised_and_balance_improvement() -> None:
    famo = build_weighting("famo", TASKS)
    gen = torch.Generator().manual_seed(0)
    for step in range(300):
        losses = torch.rand(3, generator=gen) + 0.01
        _, w = famo(losses, StepContext(step=step))
        assert (w > 0).all() and w.sum().item() == pytest.approx(3.0, rel=1e-5)
    # task a keeps improving, task b stalls, task c improves half as fast: b's logit rises, a's falls
    famo = build_weighting("famo", [TaskSpec("a"), TaskSpec("b"), TaskSpec("c")])
    for step in range(200):
        losses = torch.tensor([math.exp(-0.02 * step), 1.0, math.exp(-0.01 * step)])
        _, w = famo(losses, StepContext(step=step))
    logits = dict(famo.named_buffers())["_logits"]
    assert logits[1] > logits[2] > logits[0]
    # with equal losses the weights follow softmax(logits), so the stalled task weighs most
    _, w = famo(torch.ones(3), StepContext(step=200))
    assert w.argmax().item() == 1 and w.sum().item() == pytest.approx(3.0, rel=1e-5)


@pytest.mark.parametrize("name", ["famo", "gradnorm"])
def test_eval_mode_does_not_change_state(name: str) -> None:
    model = SharedBottom()
    weighting = build_weighting(name, TASKS)
    ctx = StepContext(shared_params=list(model.bottom.parameters()))
    weighting(_losses(model, 0), ctx)
    weighting.eval()
    before = {k: v.clone() for k, v in weighting.state_dict().items()}
    weighting(_losses(model, 1) * 0.1, ctx)
    assert all(torch.allclose(before[k], v, equal_nan=True) for k, v in weighting.state_dict().items())
    weighting.train()
    weighting(_losses(model, 1) * 0.1, ctx)
    assert not all(torch.allclose(before[k], v, equal_nan=True) for k, v in weighting.state_dict().items())


def test_rlw_weights_positive_normalised_and_rank_identical() -> None:
    a, b = build_weighting("rlw", TASKS, seed=3), build_weighting("rlw", TASKS, seed=3)  # two "ranks"
    seen = []
    for step in range(100):
        _, wa = a(torch.ones(3), StepContext(step=step))
        _, wb = b(torch.ones(3), StepContext(step=step))
        assert torch.equal(wa, wb)
        assert (wa > 0).all() and wa.sum().item() == pytest.approx(3.0, rel=1e-5)
        seen.append(wa)
    assert torch.stack(seen).std(0).min() > 0.1  # fresh weights every step
    _, other_seed = build_weighting("rlw", TASKS, seed=4)(torch.ones(3), StepContext(step=0))
    assert not torch.equal(other_seed, seen[0])
