"""``euphonium.compat``: Flow-GRPO's and DanceGRPO's (and upstream Euphonium's) step functions on the ops.

The references below are the peers' published step functions written out again here from their
formulas (Flow-GRPO ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``, DanceGRPO
``fastvideo/train_grpo_*.py`` ``flux_step``, upstream Euphonium
``euphonium/grpo/grpo_sampling/flux_step.py``): the same expressions in the same order, the same
random draws. The compat functions must give the same outputs (to fp32 rounding), dtypes and shapes,
consume the generators identically, give gradients into ``model_output`` equal to autograd's through
the references, and return bit-equal log-probs in rollout and training mode.
"""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from euphonium.compat import dance_grpo, flow_grpo
from euphonium.ops import _sde_torch

SHAPE = (4, 3, 2, 8, 8)  # [B, C, T, H, W]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# The published steps
# ------------------------------------------------------------------------------------------------


def flow_grpo_published(
    scheduler, model_output, timestep, sample, noise_level=0.7, prev_sample=None, generator=None, sde_type="sde"
):
    """Flow-GRPO's ``sde_step_with_logprob`` (with ``return_sqrt_dt=True``)."""
    model_output, sample = model_output.float(), sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()
    index = [scheduler.index_for_timestep(t) for t in timestep]
    view = (-1,) + (1,) * (sample.dim() - 1)
    sigma = scheduler.sigmas[index].view(view)
    sigma_prev = scheduler.sigmas[[i + 1 for i in index]].view(view)
    sigma_max = scheduler.sigmas[1].item()
    dt = sigma_prev - sigma
    if sde_type == "sde":
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        mean = (
            sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
            + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        )
        if prev_sample is None:
            eps = randn_tensor(model_output.shape, generator=generator, device=sample.device, dtype=model_output.dtype)
            prev_sample = mean + std_dev_t * torch.sqrt(-1 * dt) * eps
        std = std_dev_t * torch.sqrt(-1 * dt)
        log_prob = (
            -((prev_sample.detach() - mean) ** 2) / (2 * std**2)
            - torch.log(std)
            - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
        )
    else:
        std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
        x0 = sample - sigma * model_output
        x1 = sample + model_output * (1 - sigma)
        mean = x0 * (1 - sigma_prev) + x1 * torch.sqrt(sigma_prev**2 - std_dev_t**2)
        if prev_sample is None:
            eps = randn_tensor(model_output.shape, generator=generator, device=sample.device, dtype=model_output.dtype)
            prev_sample = mean + std_dev_t * eps
        log_prob = -((prev_sample.detach() - mean) ** 2)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, mean, std_dev_t, torch.sqrt(-1 * dt)


def dance_grpo_published(
    model_output,
    latents,
    eta,
    sigmas,
    index,
    prev_sample,
    grpo,
    sde_solver,
    reward_gradient=None,
    scale=0.1,
    normalize=True,
    kl_beta=0.1,
    spsa_gradient=None,
    spsa_scale=0.1,
    guided_logprob=True,
    delta_t_scaling=False,
):
    """DanceGRPO's ``flux_step``; with a gradient, upstream Euphonium's guided one."""
    sigma = sigmas[index]
    dsigma = sigmas[index + 1] - sigma
    mean = latents + dsigma * model_output
    x0 = latents - sigma * model_output
    delta_t = sigma - sigmas[index + 1]
    std_dev_t = eta * math.sqrt(delta_t)
    if sde_solver:
        score = -(latents - x0 * (1 - sigma)) / sigma**2
        mean = mean + (-0.5 * eta**2 * score) * dsigma
    unguided = mean.clone()
    for g, s in ((reward_gradient, scale), (spsa_gradient, spsa_scale)):
        if g is not None and g.norm() > 0:
            c = s if s >= 0 else eta**2 / (2 * kl_beta)
            if delta_t_scaling:
                c = c * delta_t
            g = g / (g.norm() + 1e-8) if normalize else g
            mean = mean + c * g.to(mean.dtype)
    if grpo and prev_sample is None:
        prev_sample = mean + torch.randn_like(mean) * std_dev_t
    if not grpo:
        return mean, x0
    m = mean if guided_logprob else unguided
    log_prob = (
        -((prev_sample.detach().to(torch.float32) - m.to(torch.float32)) ** 2) / (2 * std_dev_t**2)
        - math.log(std_dev_t)
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    return prev_sample, x0, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def scheduler(num_steps=10, shift=3.0):
    s = FlowMatchEulerDiscreteScheduler(shift=shift)
    s.set_timesteps(num_steps)
    return s


def inputs(dtype, seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    return x, v


def dance_sigmas(num_steps=8, shift=3.0):
    t = torch.linspace(1, 0, num_steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def close(a, b, atol, rtol=1e-5):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


class UpcastLog(TorchDispatchMode):
    """Records ``(input dtype, output)`` of every copy/conversion that makes a latent-sized fp32 tensor."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.upcasts = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_", "to") and isinstance(out, torch.Tensor):
            src = args[1] if name == "copy_" else args[0]
            if out.dtype == torch.float32 and out.numel() == self.numel and src.dtype != torch.float32:
                self.upcasts.append(out.data_ptr())
        return out


# ------------------------------------------------------------------------------------------------
# Flow-GRPO
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type", flow_grpo.SDE_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", [0, 4])  # step 0: sigma == 1 (sigma_max in the denominator)
@pytest.mark.parametrize("per_sample", [False, True])
def test_flow_grpo_rollout_matches_published(sde_type, dtype, step, per_sample):
    sched = scheduler()
    x, v = inputs(DTYPES[dtype])
    t = sched.timesteps[step]
    timestep = t.repeat(SHAPE[0]) if per_sample else t.unsqueeze(0)
    if per_sample:  # one sample a step later
        timestep = timestep.clone()
        timestep[1] = sched.timesteps[step + 1]
    gen_ours, gen_ref = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    ours = flow_grpo.sde_step_with_logprob(
        sched, v, timestep, x, 0.7, generator=gen_ours, sde_type=sde_type, return_sqrt_dt=True
    )
    ref = flow_grpo_published(sched, v, timestep, x, 0.7, generator=gen_ref, sde_type=sde_type)
    # The same generator calls: the states agree after the step.
    assert torch.equal(gen_ours.get_state(), gen_ref.get_state())
    assert len(ours) == 5
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    prev, lp, mean, std, sqrt_dt = ours
    close(prev, ref[0], atol=2e-6)
    close(mean, ref[2], atol=2e-6)
    assert torch.equal(std, ref[3]) and torch.equal(sqrt_dt, ref[4])
    # cps' quantity is ~var (1e-2): compared to its own scale.
    close(lp, ref[1], atol=1e-5 if sde_type == "sde" else 1e-7, rtol=1e-4)
    four = flow_grpo.sde_step_with_logprob(sched, v, timestep, x, 0.7, generator=gen_ours, sde_type=sde_type)
    assert len(four) == 4


@pytest.mark.parametrize("sde_type", flow_grpo.SDE_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_flow_grpo_training_log_prob_and_gradients(sde_type, dtype):
    sched = scheduler()
    x, v = inputs(DTYPES[dtype], seed=1)
    timestep = sched.timesteps[3].unsqueeze(0)
    with torch.no_grad():
        prev = flow_grpo_published(
            sched, v, timestep, x, 0.8, generator=torch.Generator().manual_seed(2), sde_type=sde_type
        )[0]
    prev = prev + 0.05 * torch.randn(prev.shape)  # off-policy: a nonzero gradient everywhere
    w_lp, w_mean = torch.randn(SHAPE[0]), torch.randn(SHAPE)
    grads, results = [], []
    for fn in (flow_grpo.sde_step_with_logprob, flow_grpo_published):
        v_ = v.clone().requires_grad_(True)
        out = fn(sched, v_, timestep, x, 0.8, prev_sample=prev.to(DTYPES[dtype]), sde_type=sde_type)
        scale = 1.0 if sde_type == "sde" else 100.0
        ((out[1] * w_lp).sum() * scale + 1e-3 * (out[2] * w_mean).sum()).backward()
        grads.append(v_.grad)
        results.append(out)
    assert grads[0].dtype == v.dtype
    close(results[0][1], results[1][1], atol=1e-5 if sde_type == "sde" else 1e-7, rtol=1e-4)
    assert results[0][0].dtype == torch.float32 and torch.equal(results[0][0], prev.to(DTYPES[dtype]).float())
    tol = 1e-5 if dtype == "fp32" else 2e-2
    close(grads[0], grads[1], atol=tol * grads[1].abs().max().item(), rtol=tol)


def test_flow_grpo_cps_last_step_has_flow_grpos_value():
    # sigma_prev == 0: std == 0, the Gaussian is degenerate; Flow-GRPO's -mean((prev - mean)^2) stands.
    sched = scheduler(num_steps=6)
    x, v = inputs(torch.float32, seed=3)
    timestep = sched.timesteps[-1].unsqueeze(0)
    prev = x + 0.1 * torch.randn(SHAPE)
    v_ours, v_ref = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    lp = flow_grpo.sde_step_with_logprob(sched, v_ours, timestep, x, 0.7, prev_sample=prev, sde_type="cps")[1]
    lp_ref = flow_grpo_published(sched, v_ref, timestep, x, 0.7, prev_sample=prev, sde_type="cps")[1]
    assert (lp < 0).all()
    close(lp, lp_ref, atol=1e-7, rtol=1e-5)
    lp.sum().backward()
    lp_ref.sum().backward()
    close(v_ours.grad, v_ref.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("sde_type", flow_grpo.SDE_TYPES)
def test_flow_grpo_first_ratio_is_exactly_one(sde_type):
    """The rollout on the whole batch (2 threads) and training on other batches (1 thread): same bits."""
    sched = scheduler()
    x, v = inputs(torch.bfloat16, seed=4, shape=(6, 4, 3, 16, 24))
    timestep = sched.timesteps[2].unsqueeze(0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            prev, lp_rollout, _, _ = flow_grpo.sde_step_with_logprob(
                sched, v, timestep, x, 0.7, generator=torch.Generator().manual_seed(5), sde_type=sde_type
            )
        torch.set_num_threads(1)
        order = torch.tensor([4, 1, 5, 0, 3, 2])
        lp_train = []
        for rows in order.split([1, 3, 2]):
            v_ = v[rows].clone().requires_grad_(True)
            lp_train.append(
                flow_grpo.sde_step_with_logprob(
                    sched, v_, timestep, x[rows], 0.7, prev_sample=prev[rows], sde_type=sde_type
                )[1]
            )
    finally:
        torch.set_num_threads(threads)
    ratio = torch.exp(torch.cat(lp_train) - lp_rollout[order])
    assert torch.equal(torch.cat(lp_train).detach(), lp_rollout[order]) and bool((ratio == 1).all())


@pytest.mark.parametrize("mode", ["rollout", "train"])
def test_flow_grpo_reads_bf16_inputs_without_fp32_copies(mode, monkeypatch):
    monkeypatch.setattr(_sde_torch, "BLOCK_ELEMENTS", 256)  # the ops' CPU path upcasts block by block
    sched = scheduler()
    x, v = inputs(torch.bfloat16, seed=6)
    prev = (x.float() + 0.1).to(torch.bfloat16) if mode == "train" else None
    timestep = sched.timesteps[2].unsqueeze(0)
    numel = x.numel()
    with UpcastLog(numel) as log:
        out = flow_grpo.sde_step_with_logprob(sched, v, timestep, x, 0.7, prev_sample=prev)
    # The one conversion allowed is the returned prev_sample (Flow-GRPO returns prev_sample.float()).
    allowed = {out[0].data_ptr()} if mode == "train" else set()
    assert set(log.upcasts) <= allowed and len(log.upcasts) == len(allowed)
    with UpcastLog(numel) as log:  # the detector works: the published step copies sample and model_output
        flow_grpo_published(sched, v, timestep, x, 0.7, prev_sample=prev, generator=torch.Generator().manual_seed(0))
    assert len(log.upcasts) >= 2


def test_flow_grpo_bad_arguments():
    sched = scheduler()
    x, v = inputs(torch.float32)
    with pytest.raises(ValueError, match="sde_type"):
        flow_grpo.sde_step_with_logprob(sched, v, sched.timesteps[:1], x, sde_type="ode")
    with pytest.raises(ValueError, match="1 or 4"):
        flow_grpo.sde_step_with_logprob(sched, v, sched.timesteps[:2], x)
    with pytest.raises(ValueError, match="noise_level"):
        flow_grpo.sde_step_with_logprob(sched, v, sched.timesteps[:1], x, noise_level=0.0)
    # A number is one timestep (Flow-GRPO itself needs an iterable).
    out = flow_grpo.sde_step_with_logprob(sched, v, float(sched.timesteps[1]), x, prev_sample=x)
    ref = flow_grpo_published(sched, v, sched.timesteps[1:2], x, prev_sample=x)
    close(out[1], ref[1], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# DanceGRPO and upstream Euphonium
# ------------------------------------------------------------------------------------------------


def dance_inputs(v_dtype, seed=0, latents_dtype=torch.float32):
    x, v = inputs(torch.float32, seed=seed)
    return x.to(latents_dtype), (3 * v).to(v_dtype)


@pytest.mark.parametrize("v_dtype", DTYPES)
@pytest.mark.parametrize("index", [0, 5])
def test_dance_grpo_rollout_matches_published(v_dtype, index):
    sigmas = dance_sigmas()
    x, v = dance_inputs(DTYPES[v_dtype], seed=7)
    torch.manual_seed(123)
    ours = dance_grpo.flux_step(v, x, 0.3, sigmas, index, None, True, True)
    state = torch.get_rng_state()
    torch.manual_seed(123)
    ref = dance_grpo_published(v, x, 0.3, sigmas, index, None, True, True)
    assert torch.equal(state, torch.get_rng_state()), "the same draws from the global generator"
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
    # The peers round dsigma * v and sigma * v to bf16 for a bf16 v; the ops do not.
    delta = float(sigmas[index] - sigmas[index + 1])
    bound = 2e-6 if v_dtype == "fp32" else 2**-8 * float(v.abs().max()) * max(delta, float(sigmas[index]))
    close(ours[0], ref[0], atol=bound)
    close(ours[1], ref[1], atol=bound)
    # The log-prob against the published formula on v's exact values (no bf16 rounding in between).
    torch.manual_seed(123)
    exact = dance_grpo_published(v.float(), x, 0.3, sigmas, index, None, True, True)
    close(ours[0], exact[0], atol=2e-6)
    close(ours[2], exact[2], atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("v_dtype", DTYPES)
@pytest.mark.parametrize("guided", [False, True])
def test_dance_grpo_training_log_prob_and_gradient(v_dtype, guided):
    sigmas = dance_sigmas()
    x, v = dance_inputs(DTYPES[v_dtype], seed=8)
    g = torch.randn(SHAPE) if guided else None
    prev = x + 0.05 * torch.randn(SHAPE)
    w = torch.randn(SHAPE[0])
    grads, outs = [], []
    for fn, kwargs in (
        (dance_grpo.flux_step, dict(reward_gradient=g, reward_gradient_scale=0.5)),
        (dance_grpo_published, dict(reward_gradient=g, scale=0.5)),
    ):
        v_ = v.float().clone().requires_grad_(True) if fn is dance_grpo_published else v.clone().requires_grad_(True)
        out = fn(v_, x, 0.3, sigmas, 2, prev, True, True, **kwargs)
        ((out[2] * w).sum() + (out[1] * 1e-3).sum()).backward()
        grads.append(v_.grad)
        outs.append(out)
    assert outs[0][0] is prev and outs[0][1].dtype == torch.float32 and outs[0][2].dtype == torch.float32
    close(outs[0][2], outs[1][2], atol=2e-4, rtol=1e-5)
    close(outs[0][1], outs[1][1], atol=2e-6)
    assert grads[0].dtype == v.dtype
    tol = 1e-5 if v_dtype == "fp32" else 1e-2
    close(grads[0], grads[1], atol=tol * float(grads[1].abs().max()), rtol=tol)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(normalize=False, scale=0.02),
        dict(scale=-1.0, kl_beta=0.2, delta_t_scaling=True),
        dict(guided_logprob=False),
        dict(spsa=True),
        dict(bf16_gradient=True),
    ],
    ids=["normalized", "raw", "kl-scale-delta-t", "unguided-logprob", "prm+spsa", "bf16-gradient"],
)
def test_upstream_euphonium_guided_step(options):
    sigmas = dance_sigmas()
    x, v = dance_inputs(torch.bfloat16, seed=9)
    gen = torch.Generator().manual_seed(10)
    g = torch.randn(SHAPE, generator=gen)
    g = g.to(torch.bfloat16) if options.get("bf16_gradient") else g
    spsa = torch.randn(SHAPE, generator=gen) if options.get("spsa") else None
    ours_kwargs = dict(
        reward_gradient=g,
        reward_gradient_scale=options.get("scale", 0.1),
        normalize_reward_gradient=options.get("normalize", True),
        reward_gradient_kl_beta=options.get("kl_beta", 0.1),
        use_spsa_reward_gradient=spsa is not None,
        spsa_reward_gradient=spsa,
        spsa_gradient_scale=0.05,
        use_reward_guided_mean_for_logprob=options.get("guided_logprob", True),
        use_delta_t_for_gradient_scaling=options.get("delta_t_scaling", False),
    )
    ref_kwargs = dict(
        reward_gradient=g,
        scale=options.get("scale", 0.1),
        normalize=options.get("normalize", True),
        kl_beta=options.get("kl_beta", 0.1),
        spsa_gradient=spsa,
        spsa_scale=0.05,
        guided_logprob=options.get("guided_logprob", True),
        delta_t_scaling=options.get("delta_t_scaling", False),
    )
    torch.manual_seed(1)
    prev, x0, lp = dance_grpo.flux_step(v, x, 0.25, sigmas, 3, None, True, True, **ours_kwargs)
    torch.manual_seed(1)
    ref = dance_grpo_published(v.float(), x, 0.25, sigmas, 3, None, True, True, **ref_kwargs)
    # The guidance moved the sample (the test is not vacuous) and both agree on where to.
    torch.manual_seed(1)
    unguided = dance_grpo_published(v.float(), x, 0.25, sigmas, 3, None, True, True)[0]
    shift = float((ref[0] - unguided).abs().max())
    assert shift > 1e-3
    # Upstream rounds g / ||g|| to g's dtype before scaling it; the ops scale g in fp32.
    atol = 2**-8 * shift if options.get("bf16_gradient") else 1e-5
    close(prev, ref[0], atol=atol)
    close(x0, ref[1], atol=2e-6)
    if not options.get("bf16_gradient"):
        close(lp, ref[2], atol=2e-4, rtol=1e-5)
    # Training on the stored transition: the same bits, and the guided mean's gradient.
    v_ = v.clone().requires_grad_(True)
    _, _, lp_train = dance_grpo.flux_step(v_, x, 0.25, sigmas, 3, prev, True, True, **ours_kwargs)
    assert torch.equal(lp_train.detach(), lp)
    lp_train.sum().backward()
    v_ref = v.float().requires_grad_(True)
    dance_grpo_published(v_ref, x, 0.25, sigmas, 3, prev, True, True, **ref_kwargs)[2].sum().backward()
    tol = 5e-2 if options.get("bf16_gradient") else 1e-2  # v_.grad is bf16
    close(v_.grad, v_ref.grad, atol=tol * float(v_ref.grad.abs().max()), rtol=tol)
    # grpo=False: the guided mean.
    mean, x0_mean = dance_grpo.flux_step(v, x, 0.25, sigmas, 3, None, False, True, **ours_kwargs)
    ref_mean = dance_grpo_published(v.float(), x, 0.25, sigmas, 3, None, False, True, **ref_kwargs)
    close(mean, ref_mean[0], atol=atol)
    close(x0_mean, ref_mean[1], atol=2e-6)


@pytest.mark.parametrize("sde_solver", [True, False])
def test_dance_grpo_mean_step(sde_solver):
    sigmas = dance_sigmas()
    x, v = dance_inputs(torch.float32, seed=11)
    ours = dance_grpo.flux_step(v, x, 0.3, sigmas, 4, None, False, sde_solver)
    ref = dance_grpo_published(v, x, 0.3, sigmas, 4, None, False, sde_solver)
    assert len(ours) == 2
    close(ours[0], ref[0], atol=2e-6)
    close(ours[1], ref[1], atol=2e-6)


def test_dance_grpo_first_ratio_is_exactly_one_and_dtypes():
    sigmas = dance_sigmas()
    x, v = dance_inputs(torch.bfloat16, seed=12, latents_dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            prev, x0, lp = dance_grpo.flux_step(v, x, 0.3, sigmas, 1, None, True, True)
        # bf16 latents and velocity: the peers' expressions stay bf16, and so do the outputs.
        assert prev.dtype == x0.dtype == torch.bfloat16 and lp.dtype == torch.float32
        torch.set_num_threads(1)
        parts = [
            dance_grpo.flux_step(
                v[i : i + 1].clone().requires_grad_(True), x[i : i + 1], 0.3, sigmas, 1, prev[i : i + 1], True, True
            )[2]
            for i in range(SHAPE[0])
        ]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.cat(parts).detach(), lp)
    # bf16 latents and an fp32 velocity: the peers' float32 dtype.
    out = dance_grpo.flux_step(v.float(), x, 0.3, sigmas, 1, None, True, True)
    assert out[0].dtype == out[1].dtype == torch.float32


def test_dance_grpo_unsupported_combination_raises():
    x, v = dance_inputs(torch.float32)
    with pytest.raises(ValueError, match="sde_solver=False"):
        dance_grpo.flux_step(v, x, 0.3, dance_sigmas(), 1, None, True, False)
