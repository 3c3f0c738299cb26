"""Statistical test of the TD process advantage on an analytic case, through the ops only.

A one-step Gaussian policy: the velocity is a parameter ``theta`` (the same for every sample), one
SDE step ``x_k -> x_{k+1}`` (``ops.sde_step``), the training log-prob ``ops.sde_log_prob`` and
the GRPO loss ``ops.grpo_loss`` on the process advantages of ``ops.dual_reward_advantages`` for a
linear PRM ``r(x) = w . x``. The step's mean is affine in ``theta``, so the direction that raises
``w . x_{k+1}`` is ``u = d(w . mean) / d theta`` (exact, from two steps without noise).

- TD form: ``A = groupnorm(r(x_{k+1}) - r(x_k))`` carries ``w . noise``, so the descent direction
  ``-dL/dtheta`` is aligned with ``u``;
- state form: ``A = groupnorm(r(x_k))`` is fixed before the step's noise is drawn, and the score
  has mean zero given ``x_k``: the expected gradient is zero.

Each group's gradient is an independent draw (groups share no noise), so the per-group gradients
give the mean and its standard error; bounds are 5 standard errors, the seed is fixed.
"""

import torch

from euphonium import ops

GROUPS, GROUP_SIZE, DIM = 400, 8, 6
STEP = dict(schedule="flow_grpo", noise_level=0.7, sigma_max=0.9)
SIGMA, SIGMA_NEXT = 0.8, 0.7


def _per_group_descent(process_form: str) -> tuple:
    gen = torch.Generator().manual_seed(20240611)
    batch = GROUPS * GROUP_SIZE
    theta = torch.randn(DIM, generator=gen) * 0.3
    w = torch.randn(DIM, generator=gen)
    # Starting states: each sample its own (as after earlier steps), so the state form has
    # something to normalise.
    x_k = torch.randn(batch, DIM, generator=gen)
    noise = torch.randn(batch, DIM, generator=gen)
    v = theta.expand(batch, DIM).contiguous()
    with torch.no_grad():
        out = ops.sde_step(x_k, v, SIGMA, SIGMA_NEXT, noise=noise, **STEP)
    x_next = out.x_next
    prm = lambda x: x @ w  # noqa: E731 (a linear process reward model)
    if process_form == "td":
        process = torch.stack([prm(x_k), prm(x_next)], dim=1)  # [B, K+1], K = 1
    else:
        process = prm(x_k)[:, None]  # [B, K]: the level at the step
    _, adv = ops.dual_reward_advantages({}, process, process_form=process_form, group_size=GROUP_SIZE)
    # The policy gradient, per sample: a leaf velocity per sample, all equal to theta.
    v_leaf = v.clone().requires_grad_()
    log_prob = ops.sde_log_prob(x_k, v_leaf, x_next, SIGMA, SIGMA_NEXT, **STEP)
    old = out.log_prob
    loss, stats = ops.grpo_loss(log_prob[:, None], old[:, None], adv, clip_range=1e-4, adv_clip=None)
    assert abs(stats["ratio_max_dev"]) < 1e-5  # on-policy: the ratio is 1
    (grad,) = torch.autograd.grad(loss, [v_leaf])
    descent = -grad.reshape(GROUPS, GROUP_SIZE, DIM).sum(1) * GROUPS  # per group, mean = -dL/dtheta
    # u: the change of w . mean per unit of theta (the mean is affine in v), without noise.
    with torch.no_grad():
        zero = torch.zeros(DIM + 1, DIM)
        base = torch.zeros(DIM + 1, DIM)
        vs = theta + torch.cat([torch.zeros(1, DIM), torch.eye(DIM)])
        means = ops.sde_step(base, vs, SIGMA, SIGMA_NEXT, noise=zero, **STEP).x_next
        u = prm(means[1:]) - prm(means[:1])
    return descent, u / u.norm()


def _z(samples: torch.Tensor) -> float:
    return (samples.mean() / (samples.std() / samples.numel() ** 0.5)).item()


def test_td_form_aligns_with_the_reward_gradient_and_the_state_form_does_not():
    td, u = _per_group_descent("td")
    # Along u: positive, far beyond 5 standard errors.
    z_td = _z(td @ u)
    assert z_td > 5, z_td
    # Across u (every direction orthogonal to it): zero within 5 standard errors.
    across = td - (td @ u)[:, None] * u
    assert all(abs(_z(across[:, i])) < 5 for i in range(across.shape[1]))

    state, u_state = _per_group_descent("state")
    assert torch.equal(u, u_state)
    assert (state != 0).any()  # a real estimate, not an all-zero advantage
    for direction in [u, *torch.eye(u.numel())]:
        z = _z(state @ direction)
        assert abs(z) < 5, z
    # And the TD estimate is much larger along u than the state form's.
    assert (td @ u).mean() > 10 * abs((state @ u).mean())
