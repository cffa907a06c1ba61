"""Influence: first-order products, the second-order model against real optimizer steps, and the QP."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import transformers

from idistill_core.data.batch import collate
from idistill_core.errors import ConfigError, DataError
from idistill_core.steps import influence, pool_qp, qp, second_order
from tests.conftest import tiny_llama

VOCAB = 64


def _tiny_model(seed: int = 0) -> transformers.LlamaForCausalLM:
    # init range larger than the default 0.02 so the MLP gradients (and the curvature) are not vanishingly
    # small; eager attention for double backward
    model = tiny_llama(seed, vocab_size=VOCAB, initializer_range=0.2, attn_implementation="eager")
    return model.double().eval()


def _progression(gen: torch.Generator, sid: str, length: int, step: int) -> dict:
    start = int(torch.randint(0, VOCAB, (1,), generator=gen))
    ids = [(start + step * j) % VOCAB for j in range(length)]
    return {"sample_id": sid, "input_ids": ids, "labels": [-100, -100] + ids[2:]}


def _random_seq(gen: torch.Generator, sid: str, length: int) -> dict:
    ids = torch.randint(0, VOCAB, (length,), generator=gen).tolist()
    return {"sample_id": sid, "input_ids": ids, "labels": [-100, -100] + ids[2:]}


@dataclass
class Problem:
    model: transformers.LlamaForCausalLM
    landmarks: list
    targets: list
    names: list[str]


@pytest.fixture(scope="module")
def problem() -> Problem:
    """8 landmarks (3 on-task, 2 related, 3 random) in two ragged batches; 4 on-task targets."""
    gen = torch.Generator().manual_seed(1)
    ex = (
        [_progression(gen, f"a{i}", 10, 3) for i in range(3)]
        + [_progression(gen, f"b{i}", 9, 5) for i in range(2)]
        + [_random_seq(gen, f"r{i}", 11) for i in range(3)]
    )
    landmarks = [collate(ex[:4], 0), collate(ex[4:], 0)]
    targets = [collate([_progression(gen, f"t{i}", 10, 3) for i in range(4)], 0)]
    model = _tiny_model()
    names = [n for n, _ in model.named_parameters() if "down_proj" in n or "up_proj" in n]
    return Problem(model, landmarks, targets, names)


def _params(problem: Problem) -> list[torch.nn.Parameter]:
    named = dict(problem.model.named_parameters())
    return [named[n] for n in problem.names]


def _target_loss(problem: Problem) -> float:
    with torch.no_grad():
        return float(torch.cat([second_order.sample_losses(problem.model, b) for b in problem.targets]).mean())


def _actual_gd_change(problem: Problem, w: torch.Tensor, eta: float) -> float:
    """Take the real step θ' = θ − (η/|S|) Σ w_i ∇l_i on the selected parameters, measure, restore."""
    params = _params(problem)
    before = _target_loss(problem)
    losses = torch.cat([second_order.sample_losses(problem.model, b) for b in problem.landmarks])
    grads = torch.autograd.grad((w * losses).sum() / w.numel(), params)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= eta * g
    after = _target_loss(problem)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return after - before


def test_first_order_is_gradient_dot_products():
    gen = torch.Generator().manual_seed(0)
    lg = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    tg = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    expected = torch.tensor([[float(lg[j] @ tg[i]) for i in range(3)] for j in range(5)], dtype=torch.float64)
    torch.testing.assert_close(influence.first_order(lg, tg), expected)
    torch.testing.assert_close(influence.aggregated_first_order(lg, tg), expected.mean(dim=1))
    with pytest.raises(DataError, match="P=7"):
        influence.first_order(lg, tg[:, :6])


def test_p_is_landmark_gradient_dot_mean_target_gradient(problem):
    terms = second_order.second_order_terms(problem.model, problem.landmarks, problem.targets, problem.names)
    params = _params(problem)

    # Independent: one autograd call per sample, no shared graph.
    def grad_of(batch, row):
        loss = second_order.sample_losses(problem.model, batch.select([row]))[0]
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])

    g_t = torch.stack([grad_of(b, r) for b in problem.targets for r in range(len(b))]).mean(0)
    g_l = torch.stack([grad_of(b, r) for b in problem.landmarks for r in range(len(b))])
    torch.testing.assert_close(terms.p, g_l @ g_t, rtol=1e-9, atol=1e-12)
    assert terms.target_loss == pytest.approx(_target_loss(problem), rel=1e-12)


def test_q_matches_finite_difference_hessian_products(problem):
    terms = second_order.second_order_terms(problem.model, problem.landmarks, problem.targets, problem.names)
    params = _params(problem)
    g_l = torch.cat(
        [second_order.per_sample_flat_gradients(problem.model, b, problem.names) for b in problem.landmarks]
    )

    def target_grad() -> torch.Tensor:
        loss = torch.cat([second_order.sample_losses(problem.model, b) for b in problem.targets]).mean()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])

    # LlamaRMSNorm computes in float32 even for a float64 model, so gradients carry ~1e-7 relative
    # noise: a smaller step makes the difference quotient worse, not better.
    eps = 1e-3
    hu = []
    for u in g_l:
        grads = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, d in zip(params, second_order._split_like(sign * eps * u, params)):
                    p += d
            grads.append(target_grad())
            with torch.no_grad():
                for p, d in zip(params, second_order._split_like(sign * eps * u, params)):
                    p -= d
        hu.append((grads[0] - grads[1]) / (2 * eps))
    q_fd = g_l @ torch.stack(hu).T / g_l.shape[0]
    scale = float(terms.q.abs().max())
    torch.testing.assert_close(terms.q, 0.5 * (q_fd + q_fd.T), rtol=0, atol=1e-3 * scale)
    assert scale > 1e-3  # the check is not vacuous


def test_second_order_model_predicts_real_gd_step(problem):
    terms = second_order.second_order_terms(problem.model, problem.landmarks, problem.targets, problem.names)
    # Mostly on-task weights (sum 8 = |S|), so the step really lowers the target loss.
    w = torch.tensor([3.0, 2.0, 2.0, 0.0, 0.0, 0.5, 0.5, 0.0], dtype=torch.float64)
    # η large enough that first order is off by ~24%; the Taylor remainder is O(η³) for second order.
    eta = 0.3
    actual = _actual_gd_change(problem, w, eta)
    second = terms.predicted_change(w, eta)
    first = terms.predicted_change_first_order(w, eta)
    assert actual < 0
    assert abs(second - actual) < 0.03 * abs(actual)
    assert abs(second - actual) < 0.1 * abs(first - actual)
    # At a small η both agree with the real step very closely (sanity of the scaling η/|S|).
    small = _actual_gd_change(problem, w, 0.01)
    assert terms.predicted_change(w, 0.01) == pytest.approx(small, rel=1e-3)


def _restore(params: list, saved: list) -> None:
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)


def _warm_adamw(problem: Problem, lr: float, wd: float, beta2: float, steps: int) -> torch.optim.AdamW:
    params = _params(problem)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, beta2), eps=1e-8, weight_decay=wd)
    for step in range(steps):
        batch = problem.landmarks[step % 2]
        opt.zero_grad()
        second_order.sample_losses(problem.model, batch).mean().backward()
        opt.step()
    opt.zero_grad()
    return opt


@dataclass
class _Precond:
    a: dict
    b: dict
    lr: float


def _preconditioner(problem: Problem, opt: torch.optim.AdamW) -> _Precond:
    """a, b of paper §1.6 read from torch's AdamW state, bias corrections at step t+1."""
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    a, b = {}, {}
    for name, p in zip(problem.names, _params(problem)):
        state = opt.state[p]
        t = int(state["step"]) + 1
        denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + group["eps"]
        a[name] = (1 - beta1) / (1 - beta1**t) / denom
        b[name] = group["weight_decay"] * p.detach() + beta1 / (1 - beta1**t) * state["exp_avg"] / denom
    return _Precond(a, b, group["lr"])


def _weighted_landmark_grads(problem: Problem, w: torch.Tensor) -> list[torch.Tensor]:
    losses = torch.cat([second_order.sample_losses(problem.model, b) for b in problem.landmarks])
    return list(torch.autograd.grad((w * losses).sum() / w.numel(), _params(problem)))


def test_second_order_model_predicts_frozen_v_adamw_step(problem):
    """The model is exact up to O(η³) for the step it assumes: θ' = θ − η(b + a ⊙ g_w)."""
    params = _params(problem)
    saved = [p.detach().clone() for p in params]
    w = torch.tensor([3.0, 2.0, 2.0, 0.0, 0.0, 0.5, 0.5, 0.0], dtype=torch.float64)
    try:
        opt = _warm_adamw(problem, lr=0.003, wd=0.1, beta2=0.99, steps=8)
        pre = _preconditioner(problem, opt)
        terms = second_order.second_order_terms(problem.model, problem.landmarks, problem.targets, problem.names, pre)
        before = _target_loss(problem)
        grads = _weighted_landmark_grads(problem, w)
        with torch.no_grad():
            for p, g, name in zip(params, grads, problem.names):
                p -= pre.lr * (pre.b[name] + pre.a[name] * g)
        actual = _target_loss(problem) - before
    finally:
        _restore(params, saved)
    second = terms.predicted_change(w)
    first = terms.predicted_change_first_order(w)
    assert abs(second - actual) < 0.02 * abs(actual)
    assert abs(second - actual) < 0.1 * abs(first - actual)


def test_second_order_model_predicts_real_adamw_step_within_frozen_v_error(problem):
    """A real torch AdamW step also updates v; with a warmed, near-stationary v (β2=0.9, 30 steps) the
    frozen-v model stays within 2% (stated tolerance of the approximation)."""
    params = _params(problem)
    saved = [p.detach().clone() for p in params]
    w = torch.tensor([3.0, 2.0, 2.0, 0.0, 0.0, 0.5, 0.5, 0.0], dtype=torch.float64)
    try:
        opt = _warm_adamw(problem, lr=0.003, wd=0.1, beta2=0.9, steps=30)
        pre = _preconditioner(problem, opt)
        terms = second_order.second_order_terms(problem.model, problem.landmarks, problem.targets, problem.names, pre)
        before = _target_loss(problem)
        opt.zero_grad()
        for p, g in zip(params, _weighted_landmark_grads(problem, w)):
            p.grad = g
        opt.step()
        actual = _target_loss(problem) - before
    finally:
        _restore(params, saved)
    assert abs(terms.predicted_change(w) - actual) < 0.02 * abs(actual)


def test_simplex_projection_matches_kkt():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(50, generator=gen, dtype=torch.float64)
    w = qp.project_simplex(v, 7.0)
    assert float(w.sum()) == pytest.approx(7.0)
    assert bool((w >= 0).all())
    # KKT: w = max(v − τ, 0) for one τ; v − w is constant on the support and ≥ τ-gap off it.
    support = w > 0
    tau = (v - w)[support]
    torch.testing.assert_close(tau, tau.mean().expand_as(tau))
    assert bool((v[~support] <= tau.mean() + 1e-12).all())


def test_first_order_weights_select_exactly_the_top_k():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(40, generator=gen, dtype=torch.float64)
    for k in (1, 5, 17, 40):
        w = qp.first_order_weights(p, k, total=40.0)
        top = set(torch.topk(p, k).indices.tolist())
        assert set(w.nonzero().flatten().tolist()) == top
        assert float(w.sum()) == pytest.approx(40.0)
        assert bool((w >= 0).all())
        # Within the support the weights are affine in p with a positive slope (paper §1.5).
        idx = sorted(top)
        if k > 1:
            slope = (w[idx] - w[idx].mean()) / (p[idx] - p[idx].mean())
            torch.testing.assert_close(slope, slope.mean().expand_as(slope))
            assert float(slope.mean()) > 0


def test_first_order_weights_with_tie_at_cut_keep_all_tied():
    p = torch.tensor([3.0, 2.0, 2.0, 1.0], dtype=torch.float64)
    w = qp.first_order_weights(p, 2)
    assert w.nonzero().flatten().tolist() == [0, 1, 2]


def test_qp_without_q_agrees_with_closed_form():
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(30, generator=gen, dtype=torch.float64)
    sol = qp.solve_qp(p, None, eta=0.0, k=6)
    assert sol.exact and sol.num_nonzero == 6
    assert set(sol.weights.nonzero().flatten().tolist()) == set(torch.topk(p, 6).indices.tolist())
    # Same λ ⇒ same minimiser as the projection of p/λ.
    torch.testing.assert_close(sol.weights, qp.project_simplex(p / sol.lam, 30.0), atol=1e-8, rtol=0)


@pytest.mark.parametrize("k", [3, 8, 20])
def test_qp_binary_search_gives_exactly_k_nonzeros(k):
    gen = torch.Generator().manual_seed(2)
    n = 20
    p = torch.randn(n, generator=gen, dtype=torch.float64)
    # Low rank, so that λ → 0 keeps a support of at most rank + 1 < k (a full-rank Q would spread the
    # weights over more than k samples even at λ = 0; see the solve_qp docstring).
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    q = x @ x.T / n
    sol = qp.solve_qp(p, q, eta=0.5, k=k, total=10.0)
    assert sol.exact and sol.num_nonzero == k == int((sol.weights > 0).sum())
    assert float(sol.weights.sum()) == pytest.approx(10.0)
    assert bool((sol.weights >= 0).all())
    # Optimality on the simplex: the projected-gradient fixed point.
    a = 0.5 * q + sol.lam * torch.eye(n, dtype=torch.float64)
    grad = a @ sol.weights - p
    torch.testing.assert_close(
        qp.project_simplex(sol.weights - 0.1 * grad, 10.0), sol.weights, atol=1e-7, rtol=0
    )


def test_qp_with_indefinite_q_stays_convex_and_returns_closest_count_at_least_k():
    gen = torch.Generator().manual_seed(2)
    n = 20
    p = torch.randn(n, generator=gen, dtype=torch.float64)
    x = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q = (x + x.T) / 4
    floor = -0.5 * float(torch.linalg.eigvalsh(q).min())
    for k in (1, 10, 20):
        sol = qp.solve_qp(p, q, eta=0.5, k=k)
        assert sol.lam_floor == pytest.approx(floor)
        assert sol.lam >= floor
        assert sol.num_nonzero >= k
        assert float(sol.weights.sum()) == pytest.approx(n)
    assert qp.solve_qp(p, q, eta=0.5, k=20).exact


def test_qp_accepts_callable_q_and_matches_dense():
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(15, generator=gen, dtype=torch.float64)
    x = torch.randn(15, 2, generator=gen, dtype=torch.float64)
    q = x @ x.T / 15
    dense = qp.solve_qp(p, q, eta=1.0, k=4)
    op = qp.solve_qp(p, lambda v: q @ v, eta=1.0, k=4)
    assert op.num_nonzero == 4
    assert dense.num_nonzero == 4
    assert op.lam == pytest.approx(dense.lam)
    torch.testing.assert_close(op.weights, dense.weights)


def test_qp_weights_beat_uniform_and_first_order_top_k_in_real_step(problem):
    terms = second_order.second_order_terms(problem.model, problem.landmarks, problem.targets, problem.names)
    eta, k = 0.3, 3
    w_qp = qp.qp_weights(terms.p, terms.q, eta, k)
    w_fo = qp.first_order_weights(terms.p, k)
    w_uniform = torch.ones(8, dtype=torch.float64)
    assert int((w_qp > 0).sum()) == k
    real = {
        name: _actual_gd_change(problem, w, eta)
        for name, w in [("qp", w_qp), ("first", w_fo), ("uniform", w_uniform)]
    }
    assert real["qp"] < real["first"]
    assert real["qp"] < real["uniform"]


def test_pool_quadratic_equals_dense_lift():
    gen = torch.Generator().manual_seed(6)
    n_land, n_pool = 5, 12
    x = torch.randn(n_land, n_land, generator=gen, dtype=torch.float64)
    terms = second_order.SecondOrderTerms(
        p=torch.randn(n_land, generator=gen, dtype=torch.float64), q=(x + x.T) / 2, lr=0.1, num_source=n_land
    )
    c = torch.randn(n_pool, n_land, generator=gen, dtype=torch.float64)
    p_pool, quad = pool_qp.pool_terms(c, terms)
    dense = c @ (terms.q * n_land) @ c.T / n_pool
    v = torch.randn(n_pool, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(quad(v), dense @ v)
    torch.testing.assert_close(p_pool, c @ terms.p)
    evals = torch.linalg.eigvalsh(dense)
    lo, hi = quad.eig_bounds()
    assert lo == pytest.approx(float(evals.min()), abs=1e-9)
    assert hi == pytest.approx(float(evals.max()), abs=1e-9)


def test_second_order_terms_work_on_an_sdpa_model_and_restore_it(problem):
    reference = second_order.second_order_terms(problem.model, problem.landmarks, problem.targets, problem.names)
    problem.model.set_attn_implementation("sdpa")
    try:
        terms = second_order.second_order_terms(problem.model, problem.landmarks, problem.targets, problem.names)
        assert problem.model.config._attn_implementation == "sdpa"
    finally:
        problem.model.set_attn_implementation("eager")
    torch.testing.assert_close(terms.q, reference.q)
    torch.testing.assert_close(terms.p, reference.p)


def test_bad_inputs_raise_one_line_errors(problem):
    with pytest.raises(ConfigError, match="k must be in"):
        qp.solve_qp(torch.ones(3), None, 0.0, k=4)
    with pytest.raises(ConfigError, match="no parameter 'nope'"):
        second_order.second_order_terms(problem.model, problem.landmarks, problem.targets, ["nope"])
    bad = collate([{"sample_id": "empty", "input_ids": [1, 2, 3], "labels": [-100, -100, -100]}], 0)
    with pytest.raises(DataError, match="'empty'"):
        second_order.sample_losses(problem.model, bad)


# -- sketched second order ----------------------------------------------------------------------------------
SKETCH_SUBSET = "(down|up)_proj"  # the problem's parameters, as a GradientConfig regex


def _sketch_config(proj_dim):
    from idistill_core.steps.gradients import GradientConfig

    return GradientConfig(param_subset=SKETCH_SUBSET, proj_dim=proj_dim, seed=3)


def _sketch_preconditioner(problem: Problem, optimizer: str):
    """None for GD; AdamW's factors after 8 warm-up steps, which move the parameters (the caller restores them)."""
    if optimizer == "gd":
        return None
    return _preconditioner(problem, _warm_adamw(problem, lr=0.003, wd=0.1, beta2=0.99, steps=8))


@pytest.mark.parametrize("optimizer", ["gd", "adamw"])
def test_sketched_terms_without_a_sketch_are_the_real_step_terms(problem, optimizer):
    """With no projection the sketched path is the paper's model at the real step's scale: ``p``, ``Q``, the
    AdamW ``b`` term (weight decay included) and the constant equal the raw-gradient reference, which the tests
    above check against real optimizer steps and finite differences. A unit-direction model (the old one) is off
    by the gradient norms; a flipped ``b`` changes ``p`` and the constant."""
    params = _params(problem)
    saved = [p.detach().clone() for p in params]
    eta = 0.05
    try:
        pre = _sketch_preconditioner(problem, optimizer)
        flags = {n: p.requires_grad for n, p in problem.model.named_parameters()}
        sketched = second_order.sketched_second_order_terms(
            problem.model, problem.landmarks, problem.targets, _sketch_config(None), pre, lr=eta
        )
        assert {n: p.requires_grad for n, p in problem.model.named_parameters()} == flags  # restored
        exact = second_order.second_order_terms(
            problem.model, problem.landmarks, problem.targets, problem.names, pre, lr=eta
        )
    finally:
        _restore(params, saved)
    # float64 model, but LlamaRMSNorm computes in float32 and the two paths order the Hessian-vector products
    # differently: ~1e-7 relative apart (1e-5 at worst on the diagonal); a wrong scale or sign is O(1)
    scale = float(exact.p.abs().max())
    torch.testing.assert_close(sketched.p, exact.p, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(sketched.p_first, exact.p_first, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(sketched.q, exact.q, rtol=0, atol=1e-4 * float(exact.q.abs().max()))
    torch.testing.assert_close(sketched.q.diagonal(), exact.q.diagonal(), rtol=1e-4, atol=0)
    assert sketched.constant == pytest.approx(exact.constant, rel=1e-4, abs=1e-15)
    assert sketched.target_loss == pytest.approx(exact.target_loss, rel=1e-12)
    assert sketched.q_noise == 0.0  # the identity "sketches" agree
    if optimizer == "adamw":  # the b term is in play, far above the tolerance
        assert abs(exact.constant) > 1e-3 * abs(exact.constant_first) > 0
        assert float((exact.p - exact.p_first).abs().max()) > 1e-3 * scale


@pytest.mark.parametrize("optimizer", ["gd", "adamw"])
def test_sketched_second_order_at_eta_near_zero_selects_the_top_k_of_p(problem, optimizer):
    params = _params(problem)
    saved = [p.detach().clone() for p in params]
    try:
        terms = second_order.sketched_second_order_terms(
            problem.model, problem.landmarks, problem.targets, _sketch_config(512),
            _sketch_preconditioner(problem, optimizer), lr=0.0,
        )
    finally:
        _restore(params, saved)
    assert torch.equal(terms.p, terms.p_first)  # η = 0: no b term
    k = 3
    weights = qp.qp_weights(terms.p, terms.q, 1e-9, k)
    assert set(torch.topk(weights, k).indices.tolist()) == set(torch.topk(terms.p, k).indices.tolist())
    assert int((weights > 0).sum()) == k


@pytest.mark.parametrize("optimizer", ["gd", "adamw"])
def test_a_hessian_from_some_targets_keeps_every_targets_gradient_term(problem, optimizer):
    params = _params(problem)
    saved = [p.detach().clone() for p in params]
    try:
        pre = _sketch_preconditioner(problem, optimizer)
        config, eta = _sketch_config(512), 0.05
        subset = [problem.targets[0].select([1, 3])]
        mixed = second_order.sketched_second_order_terms(
            problem.model, problem.landmarks, problem.targets, config, pre, lr=eta, hessian_batches=subset
        )
        every = second_order.sketched_second_order_terms(problem.model, problem.landmarks, problem.targets, config, pre, lr=eta)
        only = second_order.sketched_second_order_terms(problem.model, problem.landmarks, subset, config, pre, lr=eta)
    finally:
        _restore(params, saved)
    # the gradient term (p at η = 0) is every target's; the curvature is the subset's alone
    torch.testing.assert_close(mixed.p_first, every.p_first, rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed.q, only.q, rtol=0, atol=1e-12)
    assert not torch.allclose(mixed.q, every.q, atol=1e-6)  # the subset's Hessian is not the whole set's
    if optimizer == "adamw":  # p = p_first - η v·H b: the subset's H
        torch.testing.assert_close(mixed.p - mixed.p_first, only.p - only.p_first, rtol=0, atol=1e-12)


def test_sketched_q_error_shrinks_with_the_sketch_and_two_sketches_estimate_it(problem):
    exact = second_order.second_order_terms(problem.model, problem.landmarks, problem.targets, problem.names).q
    errors, noise = {}, {}
    for proj_dim in (256, 4096):
        terms = second_order.sketched_second_order_terms(
            problem.model, problem.landmarks, problem.targets, _sketch_config(proj_dim)
        )
        off = ~torch.eye(exact.shape[0], dtype=torch.bool)
        errors[proj_dim] = float((terms.q - exact)[off].norm() / exact[off].norm())
        noise[proj_dim] = terms.q_noise
        torch.testing.assert_close(terms.q.diagonal(), exact.diagonal(), rtol=1e-4, atol=0)  # exact diagonal
    print(f"sketched Q off-diagonal relative error vs exact (d=8192): {errors}; two-sketch estimate {noise}")
    assert errors[4096] < errors[256] and errors[4096] < 0.5
    for proj_dim, error in errors.items():  # the estimate is a noisy measurement of the same error: same order of magnitude
        assert error / 4 < noise[proj_dim] < 4 * error
