"""The sampler (euphonium.sampler) and the diffusers adapter (euphonium.models.diffusers).

Reference loops are written here from the papers' equations (Flow-GRPO eq. for the SDE step with
``sigma_t = a sqrt(t / (1 - t))``; DanceGRPO's score-based drift with constant ``eta``), on the same
noise as the rollout (``step_noise="generator"`` consumes the generator like a diffusers pipeline).
Models are tiny random ``WanTransformer3DModel``s, the toy world's transformer, and analytic PRMs.
"""

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from euphonium import ops
from euphonium.models.diffusers import Conditioning, DiffusersFlowModel, select_attention_backend
from euphonium.sampler import (
    SamplerConfig,
    Trajectory,
    guidance_coefficient,
    noise_std,
    per_sample_norm,
    preset,
    rho_coefficient,
    rollout,
    shifted_sigmas,
)

TINY_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=32,
)
SHAPE = (4, 4, 2, 4, 4)  # [B, C, F, H, W]
TEXT_LEN = 5


@pytest.fixture(scope="module")
def wan():
    torch.set_num_threads(1)  # tiny matmuls: threading only adds overhead on a shared 2-core machine
    return WanTransformer3DModel(**TINY_WAN).eval()


@pytest.fixture
def cond():
    b = SHAPE[0]
    return Conditioning(torch.randn(b, TEXT_LEN, 32), negative_prompt_embeds=torch.randn(b, TEXT_LEN, 32))


def wan_velocity(model, x, sigma, embeds):
    """The transformer called as diffusers' Wan pipeline calls it: timestep = sigma * 1000 (float)."""
    t = torch.full((x.shape[0],), float(sigma), dtype=torch.float32) * 1000
    return model(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]


class Recorder:
    """Wraps a velocity_fn and keeps every (x, sigma, v) it sees."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, sigma, cond):
        v = self.fn(x, sigma, cond)
        self.calls.append((x.clone(), sigma.clone(), v.clone()))
        return v


class QuadraticPRM:
    """r(x) = -sum((x - target)^2) per sample: gradient -2 (x - target), maximum at the target."""

    def __init__(self, target):
        self.target = target

    def __call__(self, x, sigma, prompt_embeds):
        assert sigma.shape == (x.shape[0],) and prompt_embeds.shape[0] == x.shape[0]
        return -((x - self.target) ** 2).flatten(1).sum(1)

    def grad(self, x):
        return -2 * (x.float() - self.target)


# ----------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 2, 7, 16, 20, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, None])
def test_sigmas_equal_diffusers_scheduler(num_steps, shift):
    shift = float(torch.empty(()).uniform_(0.5, 8.0)) if shift is None else shift
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1])
    sigmas = shifted_sigmas(num_steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (num_steps + 1,)
    assert torch.equal(sigmas, scheduler.sigmas)
    assert torch.equal(sigmas[:-1] * 1000, scheduler.timesteps)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())


def test_guidance_coefficients():
    sigma, sigma_next = 0.6, 0.45
    assert guidance_coefficient(sigma, sigma_next, form="lambda", lam=0.01) == pytest.approx(0.01 * 0.15)
    # KL form: s^2 / (2 beta) * delta; Euphonium's comment: eta 0.25, beta 3.125 <=> lambda 0.01
    kl = guidance_coefficient(sigma, sigma_next, form="kl", beta=3.125, schedule="dance_grpo", noise_level=0.25)
    assert kl == pytest.approx(0.01 * 0.15)
    s = 0.7 * math.sqrt(0.6 / 0.4)
    kl = guidance_coefficient(sigma, sigma_next, form="kl", beta=2.0, schedule="flow_grpo", noise_level=0.7)
    assert kl == pytest.approx(s * s / 4.0 * 0.15)
    s1 = 0.7 * math.sqrt(1.0 / (1 - 0.9))  # flow_grpo at sigma = 1 uses sigma_max in the denominator
    assert guidance_coefficient(
        1.0, 0.9, form="kl", beta=1.0, schedule="flow_grpo", noise_level=0.7, sigma_max=0.9
    ) == pytest.approx(s1 * s1 / 2 * 0.1)
    with pytest.raises(ValueError, match="beta"):
        guidance_coefficient(sigma, sigma_next, form="kl")


# ----------------------------------------------------------------------------------------------------
# Guidance off, no window: the published loops, on the same noise
# ----------------------------------------------------------------------------------------------------


def flow_grpo_loop(model, embeds, num_steps, shift, a, seed):
    """Flow-GRPO's SDE sampler: x_{t+dt} = x + [v + s^2/(2t) (x + (1-t) v)] dt + s sqrt(-dt) eps.

    With s = a sqrt(t/(1-t)).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen)
    sigmas = shifted_sigmas(num_steps, shift)
    sigma_max = sigmas[1]
    xs, log_probs = [x], []
    for i in range(num_steps):
        t, t_next = sigmas[i], sigmas[i + 1]
        dt = t_next - t
        v = wan_velocity(model, x, t, embeds)
        std_dev_t = a * torch.sqrt(t / (1 - torch.where(t == 1, sigma_max, t)))
        mean = x * (1 + std_dev_t**2 / (2 * t) * dt) + v * (1 + std_dev_t**2 * (1 - t) / (2 * t)) * dt
        x = mean + std_dev_t * torch.sqrt(-dt) * torch.randn(SHAPE, generator=gen)
        std = std_dev_t * torch.sqrt(-dt)
        lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
        xs.append(x)
        log_probs.append(lp.mean(dim=(1, 2, 3, 4)))
    return torch.stack(xs, 1), torch.stack(log_probs, 1)


def dance_grpo_loop(model, embeds, num_steps, shift, eta, seed):
    """DanceGRPO's step: mean = x + dsigma v - eta^2/2 * score * dsigma, score = -(x - (1-sigma) x0_hat) / sigma^2."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen)
    sigmas = shifted_sigmas(num_steps, shift)
    xs, log_probs = [x], []
    for i in range(num_steps):
        sigma = sigmas[i]
        dsigma = sigmas[i + 1] - sigma
        v = wan_velocity(model, x, sigma, embeds)
        x0_hat = x - sigma * v
        score = -(x - x0_hat * (1 - sigma)) / sigma**2
        mean = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
        std = eta * math.sqrt(float(sigma - sigmas[i + 1]))
        x = mean + torch.randn(SHAPE, generator=gen) * std
        lp = -((x - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
        xs.append(x)
        log_probs.append(lp.mean(dim=(1, 2, 3, 4)))
    return torch.stack(xs, 1), torch.stack(log_probs, 1)


@pytest.mark.parametrize("method", ["flow_grpo", "dance_grpo"])
def test_rollout_equals_published_loop(wan, cond, method):
    seed = int(torch.randint(0, 2**31, ()))
    num_steps, shift, level = 8, 3.0, (0.7 if method == "flow_grpo" else 0.3)
    config = SamplerConfig(num_steps=num_steps, shift=shift, schedule=method, noise_level=level, step_noise="generator")
    model = DiffusersFlowModel(wan)
    with torch.no_grad():
        traj = rollout(model, cond, config, shape=SHAPE, seed=seed)
        loop = flow_grpo_loop if method == "flow_grpo" else dance_grpo_loop
        xs, log_probs = loop(wan, cond.prompt_embeds, num_steps, shift, level, seed)
    assert traj.latents.shape == (SHAPE[0], num_steps + 1, *SHAPE[1:]) and traj.latents.dtype == torch.float32
    assert bool(traj.is_sde.all()) and traj.sde_steps.tolist() == list(range(num_steps))
    torch.testing.assert_close(traj.latents, xs, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(traj.log_prob, log_probs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(traj.final_latent, xs[:, -1], rtol=1e-5, atol=2e-5)
    assert not bool(traj.guided.any()) and traj.guidance_shift is None and not bool(traj.process_reward.any())


def test_ode_schedule_equals_flow_match_euler_scheduler(wan, cond):
    num_steps, shift = 10, 3.0
    noise = torch.randn(SHAPE)
    traj = rollout(
        DiffusersFlowModel(wan), cond, SamplerConfig(num_steps=num_steps, shift=shift, schedule="ode"), noise=noise
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1])
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = wan(
                hidden_states=x,
                timestep=t.expand(SHAPE[0]),
                encoder_hidden_states=cond.prompt_embeds,
                return_dict=False,
            )[0]
            x = scheduler.step(v, t, x, return_dict=False)[0]
    assert torch.equal(traj.final_latent, x)
    assert torch.equal(traj.x0, x)  # the last ODE step lands on its own x0 prediction (sigma_N = 0)
    assert traj.num_sde_steps == 0 and traj.log_prob.shape == (SHAPE[0], 0) and not bool(traj.is_sde.any())


# ----------------------------------------------------------------------------------------------------
# Guidance
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["lambda", "kl"])
def test_guidance_raises_prm_reward_and_records_it(wan, cond, form):
    target = torch.randn(SHAPE) * 0.5
    prm = QuadraticPRM(target)
    seed = int(torch.randint(0, 2**31, ()))
    config = preset(
        "euphonium",
        num_steps=8,
        guidance_start=4,
        guidance_form=form,
        guidance_lambda=2.0,
        guidance_beta=0.02,
        step_noise="generator",
    )
    model = Recorder(DiffusersFlowModel(wan))
    guided = rollout(model, cond, config, shape=SHAPE, prm=prm, group_size=2, seed=seed)
    plain = rollout(DiffusersFlowModel(wan), cond, config.replace(guidance=False), shape=SHAPE, group_size=2, seed=seed)
    sigma0 = torch.zeros(SHAPE[0])
    assert bool((prm(guided.x0, sigma0, cond.prompt_embeds) > prm(plain.x0, sigma0, cond.prompt_embeds)).all())
    assert torch.equal(guided.latents[:, :5], plain.latents[:, :5])  # same noise, identical until the first guided step
    assert guided.guided.tolist() == [False] * 4 + [True] * 4
    assert not bool(guided.process_reward[:, :4].any())

    # The generator's stream: the shared initial noise of the 2 groups, then one eps per SDE step.
    gen = torch.Generator().manual_seed(seed)
    torch.randn((SHAPE[0] // 2, *SHAPE[1:]), generator=gen)
    eta, sigmas = config.noise_level, guided.sigmas
    for j in range(8):
        eps = torch.randn(SHAPE, generator=gen)
        x, v = guided.latents[:, j], model.calls[j][2]
        sigma, sigma_next = float(sigmas[j]), float(sigmas[j + 1])
        delta = sigma - sigma_next
        mean = x - delta * v - (eta**2 * delta / (2 * sigma)) * (x + (1 - sigma) * v)
        if j >= 4:
            assert torch.equal(guided.process_reward[:, j], prm(x, sigma0, cond.prompt_embeds))
            c = (2.0 if form == "lambda" else eta**2 / (2 * 0.02)) * delta
            torch.testing.assert_close(guided.guidance_shift[:, j - 4], c * prm.grad(x), rtol=1e-6, atol=1e-7)
            mean = mean + c * prm.grad(x)
        torch.testing.assert_close(guided.latents[:, j + 1], mean + eta * math.sqrt(delta) * eps, rtol=1e-5, atol=1e-5)


def test_guidance_gradient_options(wan, cond):
    target = torch.randn(SHAPE)
    prm = QuadraticPRM(target)
    config = preset("euphonium", num_steps=4, guidance_start=2, grad_normalize=True, grad_max_norm=0.5)
    traj = rollout(DiffusersFlowModel(wan), cond, config, shape=SHAPE, prm=prm, group_size=2, seed=3)
    for g, j in enumerate((2, 3)):
        c = 0.01 * float(traj.sigmas[j] - traj.sigmas[j + 1])
        norms = traj.guidance_shift[:, g].flatten(1).norm(dim=1) / c
        torch.testing.assert_close(norms, torch.full((SHAPE[0],), 0.5), rtol=1e-5, atol=0)


@pytest.mark.parametrize("schedule", ["dance_grpo", "flow_grpo", "cps"])
def test_rho_guidance_shift_is_rho_noise_stds(wan, cond, schedule):
    target = torch.randn(SHAPE)
    prm = QuadraticPRM(target)
    # cps has no noise at its last step (sigma_next = 0): its window ends before it.
    window = (0, 5) if schedule == "cps" else None
    config = preset(
        "euphonium",
        num_steps=6,
        guidance_start=2,
        guidance_form="rho",
        guidance_rho=0.7,
        schedule=schedule,
        noise_level=0.5,
        sde_window=window,
    )
    traj = rollout(DiffusersFlowModel(wan), cond, config, shape=SHAPE, prm=prm, group_size=2, seed=5)
    guided_steps = traj.sde_steps[traj.guided].tolist()
    assert guided_steps == ([2, 3, 4] if schedule == "cps" else [2, 3, 4, 5])
    for g, i in enumerate(guided_steps):
        sigma, sigma_next = float(traj.sigmas[i]), float(traj.sigmas[i + 1])
        std = noise_std(sigma, sigma_next, schedule=schedule, noise_level=0.5, sigma_max=traj.sigma_max)
        norms = traj.guidance_shift[:, g].double().flatten(1).norm(dim=1)
        torch.testing.assert_close(traj.guidance_grad_norm[:, g], prm.grad(traj.x[:, g + 2]).flatten(1).norm(dim=1))
        assert std > 0
        torch.testing.assert_close(norms, torch.full_like(norms, 0.7 * std), rtol=1e-5, atol=0)
        torch.testing.assert_close(traj.guidance_rho[:, g], torch.full((SHAPE[0],), 0.7), rtol=1e-5, atol=0)


def test_rho_coefficient_zero_gradient_and_extreme_norms():
    g = torch.zeros(3, 2, 5)
    g[1] = 1e-30  # tiny but nonzero: its norm must not underflow to 0 (sum of squares would)
    g[2] = 1e30  # huge: its norm must not overflow to inf
    norms = per_sample_norm(g)
    torch.testing.assert_close(norms, torch.tensor([0.0, 1e-30 * math.sqrt(10), 1e30 * math.sqrt(10)]))
    c = rho_coefficient(norms, 0.5, 0.2)
    shift = c[:, None, None] * g
    assert float(c[0]) == 0.0 and not bool(shift[0].any())  # a zero gradient gives no shift
    torch.testing.assert_close(per_sample_norm(shift)[1:], torch.full((2,), 0.1), rtol=1e-5, atol=0)


def test_effective_rho_is_logged_for_the_lambda_form(wan, cond):
    prm = QuadraticPRM(torch.randn(SHAPE))
    config = preset("euphonium", num_steps=4, guidance_start=2)
    traj = rollout(DiffusersFlowModel(wan), cond, config, shape=SHAPE, prm=prm, group_size=2, seed=3)
    for g, i in enumerate((2, 3)):
        sigma, sigma_next = float(traj.sigmas[i]), float(traj.sigmas[i + 1])
        std = config.noise_level * math.sqrt(sigma - sigma_next)
        want = 0.01 * (sigma - sigma_next) * traj.guidance_grad_norm[:, g] / std
        torch.testing.assert_close(traj.guidance_rho[:, g], want, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------------
# Recorded log-probs, windows, seeds, noise sharing
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "reference", "torch", "triton"])
@pytest.mark.parametrize(
    "schedule,dtype", [("flow_grpo", torch.float32), ("dance_grpo", torch.bfloat16), ("cps", torch.float32)]
)
def test_recorded_log_probs_equal_sde_log_prob_bit_for_bit(wan, cond, schedule, dtype, backend, device):
    """Rollout-time log-probs recomputed from the stored trajectory: same bits (the first ratio is 1).

    ``auto`` is the library's PyTorch path on the CPU and the fused kernels on CUDA; ``reference``
    forces the eager spec, ``torch`` the PyTorch path, ``triton`` the kernels (Triton's interpreter
    on the CPU).
    """
    model = Recorder(DiffusersFlowModel(copy.deepcopy(wan).to(device) if device != "cpu" else wan))
    cond = cond if device == "cpu" else Conditioning(cond.prompt_embeds.to(device))
    target = torch.randn(SHAPE, device=device)
    window = (1, 6) if schedule == "cps" else None
    config = SamplerConfig(
        num_steps=7,
        shift=3.0,
        schedule=schedule,
        noise_level=0.7 if schedule != "dance_grpo" else 0.3,
        sde_window=window,
        guidance=schedule != "cps",
        guidance_start=4,
    )
    prm = QuadraticPRM(target) if config.guidance else None
    with ops.use_backend(backend):
        traj = rollout(model, cond, config, shape=SHAPE, prm=prm, seed=11, dtype=dtype, device=device)
        assert traj.latents.dtype == dtype and traj.x0.dtype == dtype and traj.log_prob.dtype == torch.float32
        start = int(traj.sde_steps[0])
        for j in range(traj.num_sde_steps):
            i = start + j
            x, _, v = model.calls[i]
            assert torch.equal(x, traj.latents[:, j])
            sigma, sigma_next, kwargs = traj.step_args(j)
            recomputed = ops.sde_log_prob(traj.latents[:, j], v, traj.latents[:, j + 1], sigma, sigma_next, **kwargs)
            assert torch.equal(recomputed, traj.log_prob[:, j]), f"step {i}"
            assert torch.equal(traj.recompute_log_prob(j, v), traj.log_prob[:, j])


def test_guided_mean_log_prob(wan, cond):
    prm = QuadraticPRM(torch.randn(SHAPE))
    base = preset("euphonium", num_steps=6, guidance_start=3, guidance_lambda=1.0)
    model = Recorder(DiffusersFlowModel(wan))
    guided_mean = rollout(model, cond, base.replace(logprob_mean="guided"), shape=SHAPE, prm=prm, group_size=4, seed=5)
    unguided_mean = rollout(DiffusersFlowModel(wan), cond, base, shape=SHAPE, prm=prm, group_size=4, seed=5)
    plain = rollout(DiffusersFlowModel(wan), cond, base.replace(guidance=False), shape=SHAPE, group_size=4, seed=5)
    assert torch.equal(guided_mean.log_prob[:, :3], plain.log_prob[:, :3])
    assert torch.equal(unguided_mean.log_prob[:, :3], plain.log_prob[:, :3])
    # step 3, same x and noise: the guided mean sees pure noise, as the unguided step does ...
    torch.testing.assert_close(guided_mean.log_prob[:, 3], plain.log_prob[:, 3], rtol=1e-5, atol=1e-5)
    # ... while under the unguided mean the guided sample is off-centre by c * g: less likely
    assert bool((unguided_mean.log_prob[:, 3] < guided_mean.log_prob[:, 3]).all())
    for j in range(6):
        # The training log-prob under the guided mean is the rollout's, bit for bit: ratio exactly 1.
        assert torch.equal(guided_mean.recompute_log_prob(j, model.calls[j][2]), guided_mean.log_prob[:, j])


@pytest.mark.parametrize("form", ["lambda", "rho"])
def test_guided_mean_log_prob_is_bit_exact_per_sample_selection(wan, cond, form):
    # The trainer recomputes arbitrary (sample, step) pairs: guidance_at must give each its own g and c.
    prm = QuadraticPRM(torch.randn(SHAPE))
    config = preset("euphonium", num_steps=6, guidance_start=3, guidance_form=form, logprob_mean="guided")
    model = Recorder(DiffusersFlowModel(wan))
    traj = rollout(model, cond, config, shape=SHAPE, prm=prm, group_size=2, seed=9)
    rows, cols = torch.tensor([3, 0, 2, 1]), torch.tensor([4, 1, 5, 3])
    x = traj.latents[rows, cols]
    v = torch.stack([model.calls[int(c)][2][int(r)] for r, c in zip(rows, cols)])
    sigma, sigma_next = traj.sigmas[traj.sde_steps[cols]], traj.sigmas[traj.sde_steps[cols] + 1]
    got = ops.sde_log_prob(
        x,
        v,
        traj.latents[rows, cols + 1],
        sigma,
        sigma_next,
        schedule=traj.schedule,
        noise_level=traj.noise_level,
        sigma_max=traj.sigma_max,
        **traj.guidance_at(rows, cols),
    )
    assert torch.equal(got, traj.log_prob[rows, cols])


def test_last_step_is_never_trainable(wan, cond):
    full = rollout(DiffusersFlowModel(wan), cond, preset("dance_grpo", num_steps=5), shape=SHAPE, group_size=2, seed=1)
    assert full.trainable.tolist() == [True] * 4 + [False]
    window = rollout(DiffusersFlowModel(wan), cond, preset("flow_grpo_fast"), shape=SHAPE, group_size=2, seed=1)
    assert bool(window.trainable.all())  # its window ends in the first half


def test_score_states_scores_every_recorded_input(wan, cond):
    prm = QuadraticPRM(torch.randn(SHAPE))
    config = preset("dance_grpo", num_steps=4)
    traj = rollout(DiffusersFlowModel(wan), cond, config, shape=SHAPE, prm=prm, score_states=True, group_size=2, seed=2)
    sigma0 = torch.zeros(SHAPE[0])
    for j in range(4):
        torch.testing.assert_close(traj.process_reward[:, j], prm(traj.x[:, j], sigma0, cond.prompt_embeds))
    assert not bool(traj.guided.any())
    with pytest.raises(ValueError, match="score_states"):
        rollout(DiffusersFlowModel(wan), cond, config, shape=SHAPE, score_states=True, group_size=2, seed=2)


def test_fixed_window_records_exactly_its_steps(wan, cond):
    config = SamplerConfig(num_steps=9, shift=2.0, schedule="flow_grpo", noise_level=0.7, sde_window=(3, 7))
    model = Recorder(DiffusersFlowModel(wan))
    traj = rollout(model, cond, config, shape=SHAPE, seed=2)
    assert traj.sde_steps.tolist() == [3, 4, 5, 6] and traj.is_sde.tolist() == [False] * 3 + [True] * 4 + [False] * 2
    assert traj.latents.shape[1] == 5 and traj.log_prob.shape == (SHAPE[0], 4)
    assert bool(torch.isfinite(traj.log_prob).all())
    xs = [call[0] for call in model.calls]
    for j in range(5):
        assert torch.equal(traj.latents[:, j], xs[3 + j])
    assert torch.equal(traj.sigma, traj.sigmas[3:7]) and torch.equal(traj.sigma_next, traj.sigmas[4:8])
    # outside the window: plain Euler steps x - delta * v
    for i in (0, 1, 2, 7, 8):
        x, _, v = model.calls[i]
        nxt = xs[i + 1] if i + 1 < 9 else traj.final_latent
        torch.testing.assert_close(nxt, x - (traj.sigmas[i] - traj.sigmas[i + 1]) * v, rtol=0, atol=1e-6)
    assert torch.equal(traj.final_latent, traj.x0)  # the last step is ODE: it lands on its x0_pred


def test_random_window_per_rollout(wan, cond):
    config = SamplerConfig(num_steps=8, schedule="dance_grpo", sde_window_size=2, sde_window_range=(1, 6))
    starts = set()
    for seed in range(12):
        traj = rollout(DiffusersFlowModel(wan), cond, config, shape=SHAPE, seed=seed)
        start = int(traj.sde_steps[0])
        assert traj.sde_steps.tolist() == [start, start + 1] and 1 <= start <= 4
        assert int(traj.is_sde.sum()) == 2 and traj.latents.shape[1] == 3
        starts.add(start)
    assert len(starts) > 1
    again = rollout(DiffusersFlowModel(wan), cond, config, shape=SHAPE, seed=11)
    assert torch.equal(again.sde_steps, traj.sde_steps) and torch.equal(again.latents, traj.latents)


@pytest.mark.parametrize("step_noise", ["auto", "kernel", "generator"])
def test_seeds_reproduce(wan, cond, step_noise):
    config = preset("dance_grpo", num_steps=5, step_noise=step_noise)
    model = DiffusersFlowModel(wan)
    seed = int(torch.randint(0, 2**31, ()))
    a = rollout(model, cond, config, shape=SHAPE, group_size=2, seed=seed)
    b = rollout(model, cond, config, shape=SHAPE, group_size=2, seed=torch.Generator().manual_seed(seed))
    c = rollout(model, cond, config, shape=SHAPE, group_size=2, seed=seed + 1)
    for name in ("latents", "log_prob", "x0", "final_latent"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert not torch.equal(getattr(a, name), getattr(c, name)), name


def test_auto_step_noise_is_the_kernels_on_cuda_and_the_generators_elsewhere(wan, cond):
    config = preset("dance_grpo", num_steps=4)
    assert config.step_noise == "auto"
    assert config.step_noise_source("cuda") == "kernel" and config.step_noise_source(torch.device("cpu")) == "generator"
    assert config.replace(step_noise="kernel").step_noise_source("cpu") == "kernel"
    model = DiffusersFlowModel(wan)
    seed = int(torch.randint(0, 2**31, ()))
    auto = rollout(model, cond, config, shape=SHAPE, group_size=2, seed=seed)
    for source, same in (("generator", True), ("kernel", False)):
        other = rollout(model, cond, config.replace(step_noise=source), shape=SHAPE, group_size=2, seed=seed)
        assert torch.equal(other.latents, auto.latents) == same and torch.equal(other.log_prob, auto.log_prob) == same


def test_shared_initial_noise_per_group(wan, cond):
    config = preset("dance_grpo", num_steps=3)
    traj = rollout(DiffusersFlowModel(wan), cond, config, shape=SHAPE, group_size=2, seed=0)
    x = traj.latents[:, 0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[2], x[3]) and not torch.equal(x[0], x[2])
    assert not torch.equal(traj.final_latent[0], traj.final_latent[1])  # the SDE noise is per sample
    independent = rollout(DiffusersFlowModel(wan), cond, config.replace(same_initial_noise=False), shape=SHAPE, seed=0)
    assert not torch.equal(independent.latents[0, 0], independent.latents[1, 0])


def test_trajectory_select(wan, cond):
    config = preset("euphonium", num_steps=4, guidance_start=2)
    traj = rollout(
        DiffusersFlowModel(wan), cond, config, shape=SHAPE, prm=QuadraticPRM(torch.randn(SHAPE)), group_size=2, seed=1
    )
    sub = traj.select([3, 0])
    assert isinstance(sub, Trajectory)
    assert torch.equal(sub.latents, traj.latents[[3, 0]]) and torch.equal(sub.log_prob, traj.log_prob[[3, 0]])
    assert torch.equal(sub.guidance_shift, traj.guidance_shift[[3, 0]]) and torch.equal(sub.sde_steps, traj.sde_steps)
    sub_cond = cond.select([3, 0])
    assert torch.equal(sub_cond.prompt_embeds, cond.prompt_embeds[[3, 0]])
    assert torch.equal(sub_cond.negative_prompt_embeds, cond.negative_prompt_embeds[[3, 0]])


def test_toy_model_with_latent_prm():
    from euphonium.rewards.prm import LatentRewardModel
    from euphonium.toy import world
    from euphonium.toy.model import build_toy_model

    transformer, text_encoder = build_toy_model(seed=int(torch.randint(0, 2**31, ())))
    prm = LatentRewardModel(
        in_channels=world.CHANNELS,
        text_dim=text_encoder.config.dim,
        channels=(8, 16),
        blocks=(1, 1),
        cond_dim=16,
        sigma_freq_dim=16,
    ).eval()
    prompts = world.sample_prompts(4)
    with torch.no_grad():
        embeds = text_encoder.encode(prompts)
    model = Recorder(DiffusersFlowModel(transformer.eval()))
    shape = (4, world.CHANNELS, world.NUM_FRAMES, world.HEIGHT, world.WIDTH)
    traj = rollout(model, Conditioning(embeds), preset("euphonium"), shape=shape, prm=prm, group_size=2, seed=0)
    assert traj.latents.shape == (4, 17, *shape[1:]) and traj.guided.tolist() == [False] * 12 + [True] * 4
    assert bool(torch.isfinite(traj.process_reward).all()) and bool(traj.process_reward[:, 12:].ne(0).all())
    for j in (0, 12, 15):
        assert torch.equal(traj.recompute_log_prob(j, model.calls[j][2]), traj.log_prob[:, j])


# ----------------------------------------------------------------------------------------------------
# Adapter
# ----------------------------------------------------------------------------------------------------


def test_cfg_is_one_batched_forward_equal_to_two(wan, cond):
    x, sigma = torch.randn(SHAPE), torch.rand(SHAPE[0])
    calls = []
    hook = wan.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    try:
        with torch.no_grad():
            v = DiffusersFlowModel(wan, cfg_scale=4.5)(x, sigma, cond)
            assert len(calls) == 1
            t = sigma * 1000
            v_c = wan(hidden_states=x, timestep=t, encoder_hidden_states=cond.prompt_embeds, return_dict=False)[0]
            v_u = wan(
                hidden_states=x, timestep=t, encoder_hidden_states=cond.negative_prompt_embeds, return_dict=False
            )[0]
            plain = DiffusersFlowModel(wan)(x, sigma, cond)
    finally:
        hook.remove()
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    assert torch.equal(plain, v_c)


def test_adapter_from_pretrained(wan, cond, tmp_path):
    wan.save_pretrained(tmp_path / "transformer")
    loaded = DiffusersFlowModel.from_pretrained(str(tmp_path), torch_dtype=torch.float32, cfg_scale=2.0)
    assert isinstance(loaded.transformer, WanTransformer3DModel) and loaded.cfg_scale == 2.0
    x, sigma = torch.randn(SHAPE), torch.rand(SHAPE[0])
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, cond), DiffusersFlowModel(wan, cfg_scale=2.0)(x, sigma, cond))
    half = DiffusersFlowModel.from_pretrained(
        str(tmp_path), torch_dtype=torch.bfloat16
    )  # Wan keeps some modules in fp32
    assert half.dtype == torch.bfloat16
    with torch.no_grad():
        v = half(x, sigma, cond)
    assert v.dtype == torch.bfloat16 and bool(torch.isfinite(v.float()).all())


def test_adapter_dtype_and_backend(wan, cond):
    model = DiffusersFlowModel(wan)
    assert model.dtype == torch.float32 and model.attention_backend == "native"
    assert select_attention_backend(wan, "native") == "native"
    wan.reset_attention_backend()
    with pytest.raises(ValueError, match="attention_backend"):
        DiffusersFlowModel(wan, attention_backend="bogus")
    v = model(torch.randn(SHAPE, dtype=torch.bfloat16), torch.rand(SHAPE[0]), cond)
    assert v.dtype == torch.float32 and v.shape == SHAPE
    with pytest.raises(ValueError, match="cfg_scale"):
        DiffusersFlowModel(wan, cfg_scale=0.5)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        DiffusersFlowModel(wan, cfg_scale=2.0)(
            torch.randn(SHAPE), torch.rand(SHAPE[0]), Conditioning(cond.prompt_embeds)
        )
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        Conditioning(cond.prompt_embeds, negative_prompt_embeds=torch.randn(SHAPE[0], TEXT_LEN + 1, 32))


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,field",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(shift=-1.0), "shift"),
        (dict(schedule="ddim"), "schedule"),
        (dict(noise_level=0.0), "noise_level"),
        (dict(schedule="cps", noise_level=1.5, sde_window=(0, 3)), "noise_level"),
        (dict(schedule="flow_grpo", num_steps=1), "num_steps"),
        (dict(sde_window=(3, 2)), "sde_window"),
        (dict(sde_window=(0, 17)), "sde_window"),
        (dict(sde_window=(0, 4), sde_window_size=2), "sde_window"),
        (dict(sde_window_size=0), "sde_window_size"),
        (dict(sde_window_size=5, sde_window_range=(0, 3)), "sde_window_size"),
        (dict(sde_window_range=(0, 3)), "sde_window_range"),
        (dict(schedule="cps", noise_level=0.8), "sde_window"),
        (dict(schedule="ode", sde_window=(0, 2)), "sde_window"),
        (dict(guidance=True, guidance_start=16), "guidance_start"),
        (dict(guidance=True, guidance_start=2, guidance_end=4, sde_window=(5, 8)), "guidance_start"),
        (dict(guidance=True, guidance_form="kl"), "guidance_beta"),
        (dict(guidance=True, guidance_form="l2"), "guidance_form"),
        (dict(guidance_lambda=-0.1), "guidance_lambda"),
        (dict(guidance_interval=0), "guidance_interval"),
        (dict(grad_max_norm=0.0), "grad_max_norm"),
        (dict(logprob_mean="mean"), "logprob_mean"),
        (dict(step_noise="numpy"), "step_noise"),
        (dict(guidance=1), "guidance"),
    ],
)
def test_bad_config_names_the_field(fields, field):
    with pytest.raises((ValueError, TypeError), match=rf"SamplerConfig\.{field}"):
        SamplerConfig(**fields)


def test_bad_rollout_arguments(wan, cond):
    model = DiffusersFlowModel(wan)
    with pytest.raises(ValueError, match="prm"):
        rollout(model, cond, preset("euphonium", num_steps=4, guidance_start=2), shape=SHAPE, group_size=2)
    with pytest.raises(ValueError, match="prm"):
        rollout(model, cond, SamplerConfig(num_steps=2), shape=SHAPE, prm=QuadraticPRM(torch.zeros(SHAPE)))
    with pytest.raises(ValueError, match="group_size"):
        rollout(model, cond, preset("dance_grpo", num_steps=2), shape=SHAPE)
    with pytest.raises(ValueError, match="group_size"):
        rollout(model, cond, preset("dance_grpo", num_steps=2), shape=SHAPE, group_size=3)
    with pytest.raises(ValueError, match="shape"):
        rollout(model, cond, SamplerConfig(num_steps=2), seed=0)
    with pytest.raises(ValueError, match="velocity_fn"):
        rollout(lambda x, s, c: x[:, :1], cond, SamplerConfig(num_steps=2), shape=SHAPE)
    with pytest.raises(TypeError, match="config"):
        rollout(model, cond, dict(num_steps=2), shape=SHAPE)
    with pytest.raises(TypeError, match="unknown SamplerConfig field"):
        preset("flow_grpo", noise_levle=0.5)
    with pytest.raises(ValueError, match="preset name"):
        preset("grpo")


def test_presets_are_the_published_defaults():
    flow = preset("flow_grpo")
    assert (flow.schedule, flow.noise_level, flow.num_steps, flow.sde_window) == ("flow_grpo", 0.7, 20, (0, 19))
    assert preset("flow_grpo", num_steps=10).sde_window == (0, 9)
    fast = preset("flow_grpo_fast")
    assert (fast.schedule, fast.noise_level, fast.sde_window_size, fast.sde_window_range) == ("cps", 0.8, 3, (0, 5))
    dance = preset("dance_grpo")
    assert (dance.schedule, dance.noise_level, dance.num_steps, dance.shift, dance.same_initial_noise) == (
        "dance_grpo",
        0.3,
        16,
        3.0,
        True,
    )
    eu = preset("euphonium")
    assert (eu.schedule, eu.guidance, eu.guidance_steps(), eu.guidance_lambda, eu.logprob_mean) == (
        "dance_grpo",
        True,
        [12, 13, 14, 15],
        0.01,
        "unguided",
    )
    eu_fast = preset("euphonium_fast")
    assert (
        eu_fast.schedule,
        eu_fast.noise_level,
        eu_fast.num_steps,
        eu_fast.sde_window_size,
        eu_fast.sde_window_range,
        eu_fast.same_initial_noise,
        eu_fast.guidance_steps(),
        eu_fast.guidance_lambda,
    ) == ("cps", 0.8, 10, 3, (0, 5), True, list(range(10)), 0.01)
    assert preset("euphonium_fast", num_steps=16).sde_window_range == (0, 8)


def test_euphonium_fast_guides_exactly_the_window(wan):
    """Guidance on every SDE step is guidance on the random window's steps; a group (one prompt, one
    initial noise) reaches the window at one latent and leaves it at different ones."""
    prm = QuadraticPRM(torch.randn(SHAPE))
    cond = Conditioning(torch.randn(SHAPE[0] // 2, TEXT_LEN, 32).repeat_interleave(2, dim=0))
    starts = set()
    for seed in range(6):
        traj = rollout(
            DiffusersFlowModel(wan),
            cond,
            preset("euphonium_fast", guidance_lambda=1.0),
            shape=SHAPE,
            prm=prm,
            group_size=2,
            seed=seed,
        )
        start = int(traj.sde_steps[0])
        assert 0 <= start <= 2 and traj.sde_steps.tolist() == [start, start + 1, start + 2]
        assert traj.guided.tolist() == [True] * 3 and traj.guidance_shift.shape == (SHAPE[0], 3, *SHAPE[1:])
        assert bool(traj.process_reward.ne(0).all())
        assert torch.equal(traj.latents[0, 0], traj.latents[1, 0]) and not torch.equal(traj.x0[0], traj.x0[1])
        starts.add(start)
    assert len(starts) > 1
