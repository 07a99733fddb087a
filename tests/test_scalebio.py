"""The ScaleBiO core against its formulas, invariances and a convex problem with a known optimum."""

import copy

import pytest
import torch

from lmrefinery.scalebio import ScaleBiO

D, N, N_VAL, RIDGE = 6, 30, 40, 0.05
NOISE = (0.3, 1.0, 3.0)


def _ridge_problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(D, dtype=torch.float64, generator=generator)
    xs = [torch.randn(N, D, dtype=torch.float64, generator=generator) for _ in NOISE]
    ys = [x @ theta + s * torch.randn(N, dtype=torch.float64, generator=generator) for x, s in zip(xs, NOISE)]
    x_val = torch.randn(N_VAL, D, dtype=torch.float64, generator=generator)
    train = {"x": torch.cat(xs), "y": torch.cat(ys), "source_ids": torch.arange(3).repeat_interleave(N)}
    return xs, ys, train, {"x": x_val, "y": x_val @ theta}


def _train_loss(model, batch):
    """Per-example squared error plus the ridge penalty (so Σ_i p_i ℓ̄_i is exactly the ridge objective)."""
    residual = model(batch["x"]).squeeze(-1) - batch["y"]
    return residual ** 2 + RIDGE * (model.weight ** 2).sum(), batch["source_ids"]


def _val_loss(model, batch):
    return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()


def _core(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = torch.nn.Linear(D, 1, bias=False).double()
    settings = dict(alpha=100.0, lr_lower=0.2, lr_upper=0.002, lr_weights=1.0, optimizer="sgd", weight_decay=0.0,
                    schedule="constant", warmup_ratio=0.0)
    settings.update(kwargs)
    return ScaleBiO(model, 3, _train_loss, _val_loss, **settings)


def _subset(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def test_weight_gradient_equals_the_formula_and_autograd():
    _, _, train, val = _ridge_problem()
    core = _core(alpha=7.0)
    with torch.no_grad():
        core.logits.copy_(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
        core.upper_model.weight.add_(0.1)  # u ≠ w so that the discrepancy is not zero
    lower, upper = copy.deepcopy(core.lower_model), copy.deepcopy(core.upper_model)
    p = torch.softmax(core.logits.detach(), 0)
    core.step(train, val)
    with torch.no_grad():
        mean_loss = [torch.stack([_train_loss(m, train)[0][train["source_ids"] == i].mean() for i in range(3)])
                     for m in (lower, upper)]
    jacobian = torch.diag(p) - torch.outer(p, p)
    expected = 7.0 * jacobian @ (mean_loss[1] - mean_loss[0])
    torch.testing.assert_close(core.logits.grad, expected, atol=1e-6, rtol=0)
    logits = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    objective = 7.0 * (torch.softmax(logits, 0) * (mean_loss[1] - mean_loss[0])).sum()
    torch.testing.assert_close(core.logits.grad, torch.autograd.grad(objective, logits)[0], atol=1e-6, rtol=0)


def test_step_is_invariant_to_micro_batching():
    _, _, train, val = _ridge_problem()
    settings = dict(optimizer="adamw", lr_lower=0.01, lr_upper=0.01, lr_weights=0.01,
                    val_weight_fn=lambda batch: len(batch["y"]))
    whole, split = _core(**settings), _core(**settings)
    permutation = torch.randperm(len(train["y"]), generator=torch.Generator().manual_seed(1))
    micro = [_subset(train, permutation[i: i + 23]) for i in range(0, len(permutation), 23)]  # uneven pieces
    val_micro = [_subset(val, torch.arange(0, 10)), _subset(val, torch.arange(10, 40))]
    for _ in range(3):
        whole.step(train, val)
        split.step(micro, val_micro)
    torch.testing.assert_close(whole.logits.detach(), split.logits.detach(), atol=1e-6, rtol=0)
    for a, b in ((whole.lower_model, split.lower_model), (whole.upper_model, split.upper_model)):
        torch.testing.assert_close(a.weight, b.weight, atol=1e-6, rtol=0)


def test_validation_micro_batches_weighted_by_size():
    """Without val_weight_fn micro-batches count equally; with it, the split of the validation batch is invisible."""
    _, _, train, val = _ridge_problem()
    sizes = lambda batch: len(batch["y"])  # noqa: E731
    whole, split = _core(val_weight_fn=sizes), _core(val_weight_fn=sizes)
    val_micro = [_subset(val, torch.arange(0, 10)), _subset(val, torch.arange(10, 40))]
    for _ in range(3):
        whole.step(train, val)
        split.step(train, val_micro)
    torch.testing.assert_close(whole.upper_model.weight, split.upper_model.weight, atol=1e-9, rtol=0)
    torch.testing.assert_close(whole.logits.detach(), split.logits.detach(), atol=1e-9, rtol=0)


def test_absent_source_gets_no_gradient():
    _, _, train, val = _ridge_problem()
    core = _core()
    with torch.no_grad():
        core.upper_model.weight.add_(0.1)  # u ≠ w, so present sources do get a gradient
    core.step(_subset(train, train["source_ids"] != 1), val)
    assert core.logits.grad[1].item() == 0.0
    assert core.logits.grad[0].item() != 0.0 and core.logits.grad[2].item() != 0.0


def _ridge_upper_loss(xs, ys, val, p):
    a = sum(pi * x.T @ x / N for pi, x in zip(p, xs)) + RIDGE * torch.eye(D, dtype=torch.float64)
    b = sum(pi * x.T @ y / N for pi, x, y in zip(p, xs, ys))
    theta = torch.linalg.solve(a, b)
    return float(((val["x"] @ theta - val["y"]) ** 2).mean())


def test_ridge_regression_reaches_the_bilevel_optimum():
    """Settings: K = 3 sources of 30 examples with label noise 0.3 / 1.0 / 3.0, ridge 0.05, noise-free validation;
    full batches, SGD, α = 100, learning rates u 0.2, w 0.002, λ 1.0, constant schedule, 800 steps."""
    xs, ys, train, val = _ridge_problem()
    grid = [(i / 100, j / 100, 1 - i / 100 - j / 100) for i in range(101) for j in range(101 - i)]
    optimum = min(_ridge_upper_loss(xs, ys, val, p) for p in grid)
    assert _ridge_upper_loss(xs, ys, val, (1 / 3, 1 / 3, 1 / 3)) > 5 * optimum  # reweighting matters here
    core = _core()
    for _ in range(800):
        core.step(train, val)
    learned = core.weights.tolist()
    assert _ridge_upper_loss(xs, ys, val, learned) <= 1.02 * optimum
    assert learned[0] > learned[1] > learned[2]


def test_alpha_continuation_and_learning_rate_schedule():
    _, _, train, val = _ridge_problem()
    core = _core(tau=2.0, rounds=2, total_steps=4, schedule="constant", lr_lower=0.1)
    seen = [core.step(train, val) for _ in range(4)]
    assert [m["alpha"] for m in seen] == [100.0, 100.0, 200.0, 200.0]
    assert [m["lr_lower"] for m in seen] == pytest.approx([0.1, 0.1, 0.05, 0.05])


def test_state_dict_round_trip_continues_identically():
    _, _, train, val = _ridge_problem()
    reference = _core(optimizer="adamw", lr_weights=0.05)
    for _ in range(6):
        reference.step(train, val)
    first = _core(optimizer="adamw", lr_weights=0.05)
    for _ in range(3):
        first.step(train, val)
    second = _core(seed=5, optimizer="adamw", lr_weights=0.05)
    second.load_state_dict(first.state_dict())
    for _ in range(3):
        second.step(train, val)
    torch.testing.assert_close(second.weights, reference.weights, atol=1e-12, rtol=0)
    torch.testing.assert_close(second.upper_model.weight, reference.upper_model.weight, atol=1e-12, rtol=0)


def test_weight_gradient_clipping_keeps_the_direction_and_caps_the_norm():
    _, _, train, val = _ridge_problem()
    free, clipped = _core(alpha=7.0), _core(alpha=7.0, max_weight_grad_norm=1e-3)
    for core in (free, clipped):
        with torch.no_grad():
            core.upper_model.weight.add_(0.1)  # u ≠ w: a non-zero λ-gradient
    before = clipped.logits.detach().clone()
    metrics = [core.step(train, val) for core in (free, clipped)]
    raw = free.logits.grad
    assert float(raw.norm()) > 1e-2 and metrics[1]["grad_norm_weights"] == pytest.approx(float(raw.norm()))
    torch.testing.assert_close(clipped.logits.grad, raw * (1e-3 / raw.norm()), atol=1e-12, rtol=1e-6)
    # SGD on λ (lr 1.0): the step is exactly the clipped gradient
    torch.testing.assert_close(clipped.logits.detach(), before - clipped.logits.grad, atol=1e-12, rtol=0)


def test_gradient_clipping_is_in_the_same_units_for_u_and_w():
    """w's gradient carries α: clipping at one threshold would clip only w. u is clipped at max_norm, w at α·max_norm,
    so a threshold between u's norm and w's norm / α clips neither, and a smaller one clips both proportionally."""
    _, _, train, val = _ridge_problem()
    probe = _core(alpha=10.0, lr_lower=0.0, lr_upper=0.0, lr_weights=0.0)
    with torch.no_grad():
        probe.upper_model.weight.add_(0.1)
    norms = probe.step(train, val)
    lower, upper = norms["grad_norm_lower"], norms["grad_norm_upper"]
    assert upper > 10.0 * lower * 0.5  # w's gradient is on the α scale
    for max_norm in (0.5 * min(lower, upper / 10.0), 2.0 * max(lower, upper / 10.0)):
        core = _core(alpha=10.0, lr_lower=0.0, lr_upper=0.0, lr_weights=0.0, max_grad_norm=max_norm)
        with torch.no_grad():
            core.upper_model.weight.add_(0.1)
        core.step(train, val)
        assert float(core.lower_model.weight.grad.norm()) == pytest.approx(min(lower, max_norm), rel=1e-6)
        assert float(core.upper_model.weight.grad.norm()) == pytest.approx(min(upper, 10.0 * max_norm), rel=1e-6)


def test_gradient_signal_to_noise_is_the_t_statistic_of_block_means():
    from scipy import stats

    from lmrefinery.scalebio import gradient_signal_to_noise

    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(53, 6, generator=generator, dtype=torch.float64)
    # one step per block: the one-sample t statistic of the steps
    plain = gradient_signal_to_noise(noise[:25], blocks=25)
    torch.testing.assert_close(plain.snr, torch.tensor(abs(stats.ttest_1samp(noise[:25].numpy(), 0.0).statistic)))
    assert plain.dof == 24
    # 53 steps in 10 blocks of 5 (the oldest 3 dropped): the t statistic of the 10 block means
    means = noise[3:].reshape(10, 5, 6).mean(dim=1).numpy()
    batched = gradient_signal_to_noise(noise)
    torch.testing.assert_close(batched.snr, torch.tensor(abs(stats.ttest_1samp(means, 0.0).statistic)))
    torch.testing.assert_close(batched.mean, torch.tensor(means.mean(axis=0)))
    assert batched.dof == 9
    assert torch.isnan(gradient_signal_to_noise(torch.ones(1, 3)).snr).all()


def _ar1(steps, sources, phi, generator):
    shocks = torch.randn(steps, sources, generator=generator, dtype=torch.float64)
    series = torch.zeros_like(shocks)
    series[0] = shocks[0]
    for t in range(1, steps):
        series[t] = phi * series[t - 1] + shocks[t]
    return series


def test_settle_guard_needs_the_top_source_pushed_up_and_survives_serial_correlation():
    from lmrefinery.scalebio import gradient_signal_to_noise, weights_settled

    generator = torch.Generator().manual_seed(1)
    top_first = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    # pure noise, independent or strongly correlated (φ = 0.8) from step to step: rarely "settled" with block means,
    # where the plain t statistic of the steps (one step per block) calls correlated noise a push far more often
    for phi, most in ((0.0, 0.02), (0.8, 0.08)):
        settled = [weights_settled(gradient_signal_to_noise(_ar1(50, 6, phi, generator)), top_first)
                   for _ in range(200)]
        assert sum(settled) <= most * 200, (phi, sum(settled))
    correlated = [weights_settled(gradient_signal_to_noise(g, blocks=50), top_first)
                  for g in (_ar1(50, 6, 0.8, generator) for _ in range(200))]
    assert sum(correlated) >= 0.1 * 200
    # the top source pushed up (negative λ-gradient, λ descends) at 1 sd per step: settled
    pushed = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    pushed[:, 0] -= 1.0
    assert weights_settled(gradient_signal_to_noise(pushed), top_first)
    # the same push on a source that is not on top, or the top one pushed *down*: not settled
    assert not weights_settled(gradient_signal_to_noise(pushed), top_first.flip(0))
    assert not weights_settled(gradient_signal_to_noise(-pushed), top_first)


def test_alignment_is_the_cosine_of_w_minus_u_and_the_negative_validation_gradient():
    """`log_alignment`: cos(w − u, −∇L1(w)) at the step's point, from w's gradient with the training part taken
    out; None while w = u; the step itself unchanged."""
    _, _, train, val = _ridge_problem()
    core, plain = _core(log_alignment=True), _core()
    assert core.step(train, val)["alignment"] is None and "alignment" not in plain.step(train, val)
    seen = []
    for _ in range(4):
        w = copy.deepcopy(core.upper_model)
        _val_loss(w, val).backward()
        gap = (w.weight - core.lower_model.weight).detach().flatten()
        descent = -w.weight.grad.flatten()
        expected = float(gap @ descent / (gap.norm() * descent.norm()))
        seen.append(core.step(train, val)["alignment"])
        plain.step(train, val)
        assert seen[-1] == pytest.approx(expected, abs=1e-9)
    assert len({round(value, 6) for value in seen}) > 1
    assert torch.equal(core.logits, plain.logits) and torch.equal(core.upper_model.weight, plain.upper_model.weight)


def _adam_runs(gradient_at, trials: int, steps: int, sources: int, lr: float = 0.05):
    """λ trained by Adam (the formula of torch.optim.Adam, run for many trials at once) on the λ-gradients
    `gradient_at(step, λ)` gives ([trials, K]); returns the gradients [trials, steps, K] and the weights softmax(λ)
    [trials, steps + 1, K], the first row before any step — what a `reweight` run logs."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    logits = torch.zeros(trials, sources, dtype=torch.float64)
    first, second = torch.zeros_like(logits), torch.zeros_like(logits)
    gradients, weights = [], [torch.softmax(logits, dim=1)]
    for step in range(1, steps + 1):
        gradient = gradient_at(step, logits)
        first = beta1 * first + (1 - beta1) * gradient
        second = beta2 * second + (1 - beta2) * gradient ** 2
        logits = logits - lr * (first / (1 - beta1 ** step)) / ((second / (1 - beta2 ** step)).sqrt() + eps)
        gradients.append(gradient)
        weights.append(torch.softmax(logits, dim=1))
    return torch.stack(gradients, dim=1), torch.stack(weights, dim=1)


def test_the_adam_runs_of_the_settle_guard_tests_are_torch_adam():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    _, weights = _adam_runs(lambda step, logits: noise[step - 1].unsqueeze(0), 1, 30, 4)
    logits = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    for gradient in noise:
        logits.grad = gradient.clone()
        optimizer.step()
    torch.testing.assert_close(weights[0, -1], torch.softmax(logits.detach(), dim=0))


def _verdicts(gradients, weights):
    from lmrefinery.scalebio import settle_verdict

    return [settle_verdict(g, w) for g, w in zip(gradients, weights)]


def test_settle_guard_accepts_a_plateau_reached_by_a_push_and_not_noise_that_stalls():
    """At a fixed point of λ nothing is pushed, so the push rule alone warns there as it does under noise. Designed
    runs of Adam on λ: a push to a fixed point (a restoring λ-gradient κ(λ − λ*) plus batch noise) must count as
    settled — mostly through the plateau rule; pure noise (independent or AR(1)-correlated, 3 or 6 sources) must
    not pass as a plateau; nor a noise walk that stops (λ-gradients 0 over the second half): it has stopped, but was
    never pushed."""
    steps, trials = 200, 200
    generator = torch.Generator().manual_seed(2)
    target = torch.tensor([4.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # reached in ≈ 80 steps: 0.92

    def towards_target(step, logits):
        return 10.0 * (logits - target) + torch.randn(logits.shape, generator=generator, dtype=torch.float64)

    plateau = _verdicts(*_adam_runs(towards_target, trials, steps, 6))
    assert sum(v.settled for v in plateau) >= 0.9 * trials
    assert sum(v.plateau and not v.pushed for v in plateau) >= 0.8 * trials
    assert all(v.top == 0 for v in plateau)
    for sources in (3, 6):
        for phi in (0.0, 0.8):
            noise = torch.stack([_ar1(steps, sources, phi, generator) for _ in range(trials)])
            verdicts = _verdicts(*_adam_runs(lambda step, logits: noise[:, step - 1], trials, steps, sources))
            assert sum(v.plateau for v in verdicts) <= (0.02 if phi == 0 else 0.08) * trials, (sources, phi)
    noise = torch.randn(trials, steps, 6, generator=generator, dtype=torch.float64)
    noise[:, steps // 2:] = 0.0  # Adam's momentum has died out before the last quarter
    stalled = _verdicts(*_adam_runs(lambda step, logits: noise[:, step - 1], trials, steps, 6))
    assert sum(v.moved_window < 0.1 * v.moved_before for v in stalled) >= 0.5 * trials
    assert sum(v.settled for v in stalled) <= 0.05 * trials
    # a push that runs to the end is still the push rule's case
    push = torch.randn(trials, steps, 6, generator=generator, dtype=torch.float64)
    push[:, :, 0] -= 1.0
    pushed = _verdicts(*_adam_runs(lambda step, logits: push[:, step - 1], trials, steps, 6))
    assert all(v.pushed and v.settled for v in pushed)
