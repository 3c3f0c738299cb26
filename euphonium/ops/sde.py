"""The guided SDE step of a flow-matching sampler and the training log-prob (DESIGN.md section 2).

Per sample ``b`` with ``delta = sigma - sigma_next`` and diffusion coefficient ``s`` of the schedule::

    x0_pred  = x - sigma * v
    mean     = x - delta * v - (s^2 * delta / (2 * sigma)) * (x + (1 - sigma) * v)   # flow_grpo, dance_grpo, ode
    std      = s * sqrt(delta)
    mean_g   = mean + c * g                              # c = guidance_scale, g = reward_grad
    x_next   = mean_g + std * eps                        # eps ~ N(0, I)
    log_prob = mean_i( -(x_next - m)^2 / (2 std^2) ) - log(std) - log(2 pi) / 2

with ``m = mean`` (``logprob_mean="unguided"``) or ``mean_g``. Schedules: ``flow_grpo``
``s = a * sqrt(sigma / (1 - sigma~))`` with ``sigma~ = sigma_max`` where ``sigma == 1``;
``dance_grpo`` ``s = eta``; ``ode`` ``s = 0``; ``cps`` (coefficient-preserving)
``std = sigma_next * sin(a * pi / 2)``, ``mean = x0_pred * (1 - sigma_next) + (x + (1 - sigma) * v) *
sqrt(sigma_next^2 - std^2)``.

Every mean is linear in ``v``: ``mean = a_x * x + k * v``; the training gradient is
``d log_prob / d v = k * (x_next - mean) / (std^2 * N)`` (``N`` elements per sample), with
``k = -delta * (1 + s^2 (1 - sigma) / (2 sigma))`` for the SDE schedules and
``k = -sigma * (1 - sigma_next) + (1 - sigma) * sqrt(sigma_next^2 - std^2)`` for ``cps``.

The eager ``*_reference`` functions are the spec and the benchmark baseline: they are written the
way Flow-GRPO / DanceGRPO trainers write the step (whole-tensor fp32 upcasts, one op at a time).
The public functions run (``euphonium.ops._backend``): on CUDA (or with ``EUPHONIUM_BACKEND=triton``)
one fused Triton kernel per direction from ``euphonium.kernels.sde``; on CPU tensors (or with
``EUPHONIUM_BACKEND=torch``) the same arithmetic in PyTorch ops over cache-sized blocks
(``euphonium.ops._sde_torch``); with ``EUPHONIUM_BACKEND=reference`` the eager reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch

from euphonium._checks import check_choice, check_like, per_sample
from euphonium.ops import _sde_torch
from euphonium.ops._backend import resolve
from euphonium.ops._sde_checks import (  # noqa: F401 (SCHEDULES, LOGPROB_MEANS and the limits re-exported)
    COEF_MAX,
    LOGPROB_MEANS,
    NOISE_LEVEL_MAX,
    SCHEDULES,
    SIGMA_MIN,
    STD_MIN,
    _check_guidance,
    _check_latent,
    _check_schedule,
    _check_seed,
    _check_sigmas,
    _schedule_scale,
)
from euphonium.ops._sde_torch import compute_dtype
from euphonium.ops.philox import draw_seed, philox4x32, philox_randn  # noqa: F401 (re-exported)

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
Scalar = Union[float, torch.Tensor]


class SDEStepOutput(NamedTuple):
    """Result of ``sde_step``.

    ``x_next`` and ``x0_pred`` have the shape and dtype of ``x``; ``log_prob`` is ``[B]`` float32
    (None for ``schedule="ode"``).
    """

    x_next: torch.Tensor
    log_prob: Optional[torch.Tensor]
    x0_pred: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Eager reference (the spec).
# ----------------------------------------------------------------------------------------------


def _per_sample_view(value: Scalar, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float or [B] tensor as a [B, 1, ..., 1] tensor that broadcasts against ``x``."""
    t = per_sample("value", value, x.shape[0], x.device, dtype=dtype)
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def _mean_std_reference(x, v, sigma, sigma_next, schedule, noise_level, sigma_max):
    """Eager ``(mean, std, x0_pred)`` in the compute dtype, sigmas as [B, 1, ...] views."""
    ct = compute_dtype(x)
    x = x.to(ct)
    v = v.to(ct)
    sigma = _per_sample_view(sigma, x, ct)
    sigma_next = _per_sample_view(sigma_next, x, ct)
    x0_pred = x - sigma * v
    if schedule == "cps":
        std = sigma_next * _schedule_scale("cps", noise_level)
        noise_pred = x + (1 - sigma) * v
        mean = x0_pred * (1 - sigma_next) + noise_pred * torch.sqrt(torch.clamp_min(sigma_next**2 - std**2, 0))
        return mean, std, x0_pred
    delta = sigma - sigma_next
    if schedule == "flow_grpo":
        sigma_den = sigma if sigma_max is None else torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma)
        s = noise_level * torch.sqrt(sigma / (1 - sigma_den))
    elif schedule == "dance_grpo":
        s = torch.full_like(sigma, noise_level)
    else:  # ode
        s = torch.zeros_like(sigma)
    mean = x - delta * v - (s**2 * delta / (2 * sigma)) * (x + (1 - sigma) * v)
    std = s * torch.sqrt(delta)
    return mean, std, x0_pred


def _guided_mean_reference(mean, reward_grad, guidance_scale):
    """``mean + c g`` in the dtype of ``mean`` (the step's guided mean and the guided log-prob's)."""
    if reward_grad is None:
        return mean
    c = _per_sample_view(guidance_scale, mean, mean.dtype)
    return mean + c * reward_grad.to(mean.dtype)


def _gaussian_log_prob_reference(x_next, mean, std):
    """``-mean_i((x_next - mean)^2) / (2 std^2) - log(std) - log(2 pi) / 2`` per sample; 0 where std == 0.

    The squared residuals are averaged before the one division by ``2 std^2`` (peers divide each
    element, equal in exact arithmetic): a single large residual then overflows only where the
    average does, as in the fused paths, which sum the squares first.
    """
    deterministic = (std == 0).reshape(-1)
    std_safe = torch.where(std == 0, torch.ones_like(std), std).reshape(-1)
    mean_sq = ((x_next - mean) ** 2).mean(dim=tuple(range(1, x_next.dim())))
    log_prob = -mean_sq / (2 * std_safe**2) - torch.log(std_safe) - _HALF_LOG_2PI
    return torch.where(deterministic, torch.zeros_like(log_prob), log_prob).to(
        torch.float64 if x_next.dtype == torch.float64 else torch.float32
    )


# Same formula: ops._sde_torch.sde_step (PyTorch path), kernels.sde.sde_step_forward (Triton).
def sde_step_reference(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise: Optional[torch.Tensor],
    *,
    schedule: str = "flow_grpo",
    noise_level: float = 0.7,
    sigma_max: Optional[float] = None,
    reward_grad: Optional[torch.Tensor] = None,
    guidance_scale: Scalar = 0.0,
    logprob_mean: str = "unguided",
) -> SDEStepOutput:
    """Eager PyTorch ``sde_step`` (the spec; see the module docstring for the formulas).

    Inputs are validated by ``sde_step``; here ``noise`` is a tensor like ``x`` (ignored by ``ode``).
    """
    mean, std, x0_pred = _mean_std_reference(x, v, sigma, sigma_next, schedule, noise_level, sigma_max)
    mean_g = _guided_mean_reference(mean, reward_grad, guidance_scale)
    if schedule == "ode":
        return SDEStepOutput(mean_g.to(x.dtype), None, x0_pred.to(x.dtype))
    x_next = (mean_g + std * noise.to(mean.dtype)).to(x.dtype)
    m = mean_g if logprob_mean == "guided" else mean
    log_prob = _gaussian_log_prob_reference(x_next.to(mean.dtype), m, std)
    return SDEStepOutput(x_next, log_prob, x0_pred.to(x.dtype))


# Same formula: ops._sde_torch.sde_log_prob (PyTorch path), kernels.sde.sde_log_prob_forward (Triton).
def sde_log_prob_reference(
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    schedule: str = "flow_grpo",
    noise_level: float = 0.7,
    sigma_max: Optional[float] = None,
    v_ref: Optional[torch.Tensor] = None,
    reward_grad: Optional[torch.Tensor] = None,
    guidance_scale: Scalar = 0.0,
):
    """Eager PyTorch ``sde_log_prob`` (differentiable by autograd through the eager ops).

    With ``reward_grad`` the density is around ``mean + c g`` (``sde_step_reference``'s guided mean,
    the same ops). ``kl = mean_i((mean(v) - mean(v_ref))^2) / (2 std^2)`` as peers write it (equal to
    ``k^2 mean_i((v - v_ref)^2) / (2 std^2)``; the guidance shift cancels in the difference).
    """
    mean, std, _ = _mean_std_reference(x, v, sigma, sigma_next, schedule, noise_level, sigma_max)
    m = _guided_mean_reference(mean, reward_grad, guidance_scale)
    log_prob = _gaussian_log_prob_reference(x_next.to(mean.dtype), m, std)
    if v_ref is None:
        return log_prob
    mean_ref, _, _ = _mean_std_reference(x, v_ref, sigma, sigma_next, schedule, noise_level, sigma_max)
    var = torch.where(std == 0, torch.ones_like(std), std) ** 2
    kl = ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.dim()))) / (2 * var.reshape(-1))
    kl = torch.where(std.reshape(-1) == 0, torch.zeros_like(kl), kl).to(log_prob.dtype)
    return log_prob, kl


# ----------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    schedule: str = "flow_grpo",
    noise_level: float = 0.7,
    sigma_max: Optional[float] = None,
    reward_grad: Optional[torch.Tensor] = None,
    guidance_scale: Scalar = 0.0,
    noise: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    logprob_mean: str = "unguided",
) -> SDEStepOutput:
    """One guided SDE step ``sigma -> sigma_next`` of a flow-matching sampler, with its log-prob.

    Computes (module docstring for ``s``, ``std`` and ``mean`` of each schedule)::

        x0_pred  = x - sigma * v
        x_next   = mean + guidance_scale * reward_grad + std * eps
        log_prob = mean_i(-(x_next - m)^2 / (2 std^2)) - log(std) - log(2 pi) / 2

    Args:
        x: latents ``[B, ...]`` (rank >= 2, any sizes), float32/bfloat16/float16. float64 is
            accepted: the reference and the PyTorch path then compute (and return ``log_prob``) in
            float64, the kernels in fp32.
        v: predicted velocity, shape of ``x``, any float dtype.
        sigma, sigma_next: floats or ``[B]`` tensors with ``0 <= sigma_next < sigma <= 1`` (tensor
            sigmas cost one host sync for this check).
        schedule: ``"flow_grpo"``, ``"dance_grpo"``, ``"cps"`` or ``"ode"`` (deterministic Euler:
            ``std = 0``, ``noise``/``seed`` have no effect).
        noise_level: ``a`` of flow_grpo / cps, ``eta`` of dance_grpo (ignored by ode).
        sigma_max: flow_grpo's denominator clamp at ``sigma == 1`` (required there).
        reward_grad: ``g = grad_x r_p``, shape of ``x``; with ``guidance_scale`` (float or ``[B]``)
            it shifts the mean by ``c * g``.
        noise: ``eps``, shape of ``x``, any float dtype. When None, drawn in-kernel with Philox
            from ``seed`` (an int in ``[0, 2^63)``; element ``i`` of the flattened tensor is
            ``tl.randn(seed, i)``, the same integer stream on every backend, the normals equal up to
            the last bits of ``log``/``cos``; the PyTorch path draws it block by block, at about
            10x the cost of ``torch.randn`` on a CPU); ``seed=None`` draws a seed from torch's default generator, so
            ``torch.manual_seed`` makes a rollout reproducible. Pass ``noise`` or ``seed``, not both.
        logprob_mean: ``"unguided"`` (``m = mean``, default: GRPO then distils the guidance into the
            policy) or ``"guided"`` (``m = mean + c * g``, the density actually sampled;
            ``sde_log_prob`` given the same ``reward_grad`` and ``guidance_scale`` returns its bits).

    Returns:
        ``SDEStepOutput(x_next, log_prob, x0_pred)``: ``x_next``/``x0_pred`` in the dtype of ``x``;
        ``log_prob`` ``[B]`` float32 computed at the returned (rounded) ``x_next``, so that
        ``sde_log_prob(x, v, out.x_next, ...)`` returns the same bits; None for ``ode``. A sample
        whose ``std`` is 0 (``cps`` at ``sigma_next == 0``) is deterministic and gets log-prob 0.

    Range: every backend computes the step in fp32 without under- or overflow of its per-sample
    coefficients, and refuses (ValueError naming the arguments and the bound, the same on every
    backend) a step outside it: ``sigma >= 2^-100``, a noise ``std`` of 0 (cps at
    ``sigma_next == 0``) or ``>= 2^-40``, ``noise_level <= 2^20`` (flow_grpo, dance_grpo),
    ``sigma_max`` below 1 in fp32 and coefficients (``s^2``, ``d mean / d x``, ``d mean / d v``)
    ``<= 2^40``. Inside it, latents, velocities, ``reward_grad`` and noise up to ``2^80`` in magnitude
    give finite steps that agree between backends; nearer fp32's largest value the backends' orders of
    operations (the reference forms ``x + (1 - sigma) v`` as peers do, the kernels ``a_x x + k v``)
    can overflow at different elements. ``sde_log_prob`` averages the squared residuals before
    dividing by ``2 std^2`` on every backend, so a log-prob overflows to ``-inf`` for the same samples.

    All arithmetic is fp32 whatever the input dtype; the log-prob reduction is deterministic (on the
    PyTorch path also independent of torch's thread count). The step is a rollout op: the reference
    is differentiable by autograd, the fused paths (Triton kernel, PyTorch path) are not and raise
    if an input requires grad while grad mode is on (train through ``sde_log_prob``).
    """
    _check_latent("x", x)
    check_like("v", v, "x", x)
    noise_level, sigma_max = _check_schedule(schedule, noise_level, sigma_max)
    check_choice("logprob_mean", logprob_mean, LOGPROB_MEANS)
    if noise is not None:
        check_like("noise", noise, "x", x)
    seed = _check_seed(seed, noise)
    sigma_t, sigma_next_t = _check_sigmas(sigma, sigma_next, x, schedule, sigma_max, noise_level)
    reward_grad, scale_t = _check_guidance(reward_grad, guidance_scale, x)

    backend = resolve(x.device, torch_path=True, kernels="sde")
    if backend == "reference":
        if noise is None and schedule != "ode":
            noise = philox_randn(draw_seed() if seed is None else seed, x.numel(), x.device).reshape(x.shape)
        return sde_step_reference(
            x,
            v,
            sigma_t,
            sigma_next_t,
            noise,
            schedule=schedule,
            noise_level=noise_level,
            sigma_max=sigma_max,
            reward_grad=reward_grad,
            guidance_scale=scale_t if scale_t is not None else 0.0,
            logprob_mean=logprob_mean,
        )

    if torch.is_grad_enabled():
        for name, t in (
            ("x", x),
            ("v", v),
            ("reward_grad", reward_grad),
            ("noise", noise),
            ("sigma", sigma),
            ("sigma_next", sigma_next),
            ("guidance_scale", guidance_scale),
        ):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError(
                    f"sde_step's fused step ({backend} backend) is not differentiable, but {name} requires grad: run "
                    "the rollout under torch.no_grad() and train through sde_log_prob, or use the reference backend "
                    "(differentiable by autograd) with EUPHONIUM_BACKEND=reference"
                )
    if noise is None and seed is None and schedule != "ode":
        seed = draw_seed()
    args = (
        x,
        v,
        sigma_t,
        sigma_next_t,
        reward_grad,
        scale_t,
        noise,
        0 if seed is None else seed,
        schedule,
        _schedule_scale(schedule, noise_level),
        sigma_max,
        logprob_mean == "guided",
        backend,
    )
    if torch.compiler.is_compiling():
        x_next, log_prob, x0_pred = _sde_step_op(*args)
        log_prob = None if schedule == "ode" else log_prob
    else:
        x_next, log_prob, x0_pred = _fused_step(*args)
    return SDEStepOutput(x_next, log_prob, x0_pred)


# ----------------------------------------------------------------------------------------------
# The fused paths: Triton kernels (euphonium.kernels.sde) or their PyTorch counterpart
# (euphonium.ops._sde_torch), with one signature per direction; ``backend`` picks.
# ----------------------------------------------------------------------------------------------


def _fused_step(
    x,
    v,
    sigma,
    sigma_next,
    reward_grad,
    guidance_scale,
    noise,
    seed,
    schedule,
    scale,
    sigma_max,
    guided_logprob,
    backend,
):
    if backend == "torch":
        return _sde_torch.sde_step(
            x,
            v,
            sigma,
            sigma_next,
            reward_grad,
            guidance_scale,
            noise,
            seed,
            schedule,
            scale,
            sigma_max,
            guided_logprob,
        )
    from euphonium.kernels import sde as kernels

    return kernels.sde_step_forward(
        x,
        v,
        sigma,
        sigma_next,
        reward_grad=reward_grad,
        guidance_scale=guidance_scale,
        noise=noise,
        seed=seed,
        schedule=schedule,
        scale=scale,
        sigma_max=sigma_max,
        guided_logprob=guided_logprob,
    )


def _fused_log_prob(
    x, v, x_next, v_ref, reward_grad, guidance_scale, sigma, sigma_next, schedule, scale, sigma_max, backend
):
    if backend == "torch":
        return _sde_torch.sde_log_prob(
            x, v, x_next, v_ref, sigma, sigma_next, schedule, scale, sigma_max, reward_grad, guidance_scale
        )
    from euphonium.kernels import sde as kernels

    return kernels.sde_log_prob_forward(
        x,
        v,
        x_next,
        sigma,
        sigma_next,
        v_ref=v_ref,
        schedule=schedule,
        scale=scale,
        sigma_max=sigma_max,
        reward_grad=reward_grad,
        guidance_scale=guidance_scale,
    )


def _fused_log_prob_backward(
    grad_log_prob,
    grad_kl,
    x,
    v,
    x_next,
    v_ref,
    reward_grad,
    guidance_scale,
    sigma,
    sigma_next,
    schedule,
    scale,
    sigma_max,
    backend,
):
    grad_kl = grad_kl if v_ref is not None else None
    if backend == "torch":
        return _sde_torch.sde_log_prob_backward(
            grad_log_prob,
            grad_kl,
            x,
            v,
            x_next,
            v_ref,
            sigma,
            sigma_next,
            schedule,
            scale,
            sigma_max,
            reward_grad,
            guidance_scale,
        )
    from euphonium.kernels import sde as kernels

    return kernels.sde_log_prob_backward(
        grad_log_prob,
        grad_kl,
        x,
        v,
        x_next,
        sigma,
        sigma_next,
        v_ref=v_ref,
        schedule=schedule,
        scale=scale,
        sigma_max=sigma_max,
        reward_grad=reward_grad,
        guidance_scale=guidance_scale,
    )


def _log_prob_dtype(x: torch.Tensor, backend: str) -> torch.dtype:
    # The kernels return fp32; the PyTorch path keeps float64 inputs in float64 (gradcheck).
    return torch.float64 if backend == "torch" and x.dtype == torch.float64 else torch.float32


class _SDELogProb(torch.autograd.Function):
    """Fused log-prob (and KL); the backward recomputes the mean from the saved inputs (no
    intermediate is saved): ``grad_v = g_lp k (x_next - mean) / (var N) + g_kl k^2 (v - v_ref) / (var N)``."""

    @staticmethod
    def forward(
        ctx, x, v, x_next, v_ref, reward_grad, guidance_scale, sigma, sigma_next, schedule, scale, sigma_max, backend
    ):
        tensors = (x, v, x_next, v_ref, reward_grad, guidance_scale, sigma, sigma_next)
        log_prob, kl = _fused_log_prob(*tensors, schedule, scale, sigma_max, backend)
        ctx.save_for_backward(*tensors)
        ctx.config = (schedule, scale, sigma_max, backend)
        return log_prob, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_log_prob, grad_kl):
        grad_v = _fused_log_prob_backward(grad_log_prob, grad_kl, *ctx.saved_tensors, *ctx.config)
        return (None, grad_v) + (None,) * 10


# The same paths as torch.library custom ops, so that torch.compile traces through the public
# functions (used only while compiling: in eager mode the dispatcher's per-call overhead, tens of
# microseconds, would be a sizeable fraction of a step on mid-sized latents).


@torch.library.custom_op("euphonium::sde_step", mutates_args=())
def _sde_step_op(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    reward_grad: Optional[torch.Tensor],
    guidance_scale: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    seed: int,
    schedule: str,
    scale: float,
    sigma_max: Optional[float],
    guided_logprob: bool,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_next, log_prob, x0_pred = _fused_step(
        x,
        v,
        sigma,
        sigma_next,
        reward_grad,
        guidance_scale,
        noise,
        seed,
        schedule,
        scale,
        sigma_max,
        guided_logprob,
        backend,
    )
    empty = x.new_empty(0, dtype=_log_prob_dtype(x, backend))
    return x_next, empty if log_prob is None else log_prob, x0_pred


@_sde_step_op.register_fake
def _(
    x,
    v,
    sigma,
    sigma_next,
    reward_grad,
    guidance_scale,
    noise,
    seed,
    schedule,
    scale,
    sigma_max,
    guided_logprob,
    backend,
):
    batch = 0 if schedule == "ode" else x.shape[0]
    return x.new_empty(x.shape), x.new_empty(batch, dtype=_log_prob_dtype(x, backend)), x.new_empty(x.shape)


@torch.library.custom_op("euphonium::sde_log_prob", mutates_args=())
def _sde_log_prob_op(
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    v_ref: Optional[torch.Tensor],
    reward_grad: Optional[torch.Tensor],
    guidance_scale: Optional[torch.Tensor],
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    schedule: str,
    scale: float,
    sigma_max: Optional[float],
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    log_prob, kl = _fused_log_prob(
        x, v, x_next, v_ref, reward_grad, guidance_scale, sigma, sigma_next, schedule, scale, sigma_max, backend
    )
    return log_prob, x.new_empty(0, dtype=log_prob.dtype) if kl is None else kl


@_sde_log_prob_op.register_fake
def _(x, v, x_next, v_ref, reward_grad, guidance_scale, sigma, sigma_next, schedule, scale, sigma_max, backend):
    dtype = _log_prob_dtype(x, backend)
    return x.new_empty(x.shape[0], dtype=dtype), x.new_empty(0 if v_ref is None else x.shape[0], dtype=dtype)


@torch.library.custom_op("euphonium::sde_log_prob_backward", mutates_args=())
def _sde_log_prob_backward_op(
    grad_log_prob: torch.Tensor,
    grad_kl: Optional[torch.Tensor],
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    v_ref: Optional[torch.Tensor],
    reward_grad: Optional[torch.Tensor],
    guidance_scale: Optional[torch.Tensor],
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    schedule: str,
    scale: float,
    sigma_max: Optional[float],
    backend: str,
) -> torch.Tensor:
    return _fused_log_prob_backward(
        grad_log_prob,
        grad_kl,
        x,
        v,
        x_next,
        v_ref,
        reward_grad,
        guidance_scale,
        sigma,
        sigma_next,
        schedule,
        scale,
        sigma_max,
        backend,
    )


@_sde_log_prob_backward_op.register_fake
def _(grad_log_prob, grad_kl, x, v, x_next, v_ref, reward_grad, guidance_scale, *_config):
    return v.new_empty(v.shape)


def _sde_log_prob_op_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])  # x, v, x_next, v_ref, reward_grad, guidance_scale, sigma, sigma_next
    ctx.config = tuple(inputs[8:])  # schedule, scale, sigma_max, backend


def _sde_log_prob_op_backward(ctx, grad_log_prob, grad_kl):
    x, v, x_next, v_ref, reward_grad, guidance_scale, sigma, sigma_next = ctx.saved_tensors
    if grad_log_prob is None:
        grad_log_prob = torch.zeros(x.shape[0], dtype=_log_prob_dtype(x, ctx.config[-1]), device=x.device)
    grad_v = _sde_log_prob_backward_op(
        grad_log_prob,
        grad_kl if v_ref is not None else None,
        x,
        v,
        x_next,
        v_ref,
        reward_grad,
        guidance_scale,
        sigma,
        sigma_next,
        *ctx.config,
    )
    return (None, grad_v) + (None,) * 10


_sde_log_prob_op.register_autograd(_sde_log_prob_op_backward, setup_context=_sde_log_prob_op_setup)


def sde_log_prob(
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    schedule: str = "flow_grpo",
    noise_level: float = 0.7,
    sigma_max: Optional[float] = None,
    v_ref: Optional[torch.Tensor] = None,
    reward_grad: Optional[torch.Tensor] = None,
    guidance_scale: Scalar = 0.0,
):
    """Log-prob of a stored transition ``x -> x_next`` under the policy's velocity ``v`` (training).

    ``log_prob = mean_i(-(x_next - m)^2 / (2 std^2)) - log(std) - log(2 pi) / 2`` with ``m`` the
    mean of ``sde_step`` (same schedules and arguments): the unguided ``mean(v)``, or with
    ``reward_grad`` the guided ``mean(v) + guidance_scale * reward_grad``. On the same inputs it
    returns the same bits as ``sde_step(...).log_prob`` with ``logprob_mean="unguided"``, and with
    ``reward_grad``/``guidance_scale`` those of ``sde_step(..., reward_grad=g, guidance_scale=c,
    logprob_mean="guided")``, on every backend (the first importance ratio is exactly 1).
    Differentiable in ``v`` only (``c g`` is a constant)::

        d log_prob / d v = k * (x_next - m) / (std^2 * N)        k = d mean / d v

    With ``v_ref`` (a reference policy's velocity, treated as a constant) also returns
    ``kl = k^2 * mean_i((v - v_ref)^2) / (2 std^2)`` with ``d kl / d v = k^2 (v - v_ref) / (std^2 N)``
    (the guidance shift cancels between the two means, so ``kl`` does not depend on it).

    Args: ``x``, ``x_next``, ``v`` (and ``v_ref``, ``reward_grad``) of one shape ``[B, ...]``; sigmas
    and ``guidance_scale`` floats or ``[B]`` tensors, as for ``sde_step`` (a float
    ``guidance_scale == 0`` means no guidance; a ``[B]`` scale with zeros leaves those samples'
    means, and their log-probs' bits, unguided).
    Returns: ``log_prob`` ``[B]`` float32 (float64 from the reference and the PyTorch path for float64
    inputs, e.g. for gradcheck), or ``(log_prob, kl)`` when ``v_ref`` is given. Samples with
    ``std == 0`` (``cps`` at ``sigma_next == 0``) get 0 and a zero gradient. ``schedule="ode"`` has
    no log-prob and raises.
    """
    _check_latent("x", x)
    check_like("v", v, "x", x)
    check_like("x_next", x_next, "x", x)
    noise_level, sigma_max = _check_schedule(schedule, noise_level, sigma_max)
    if schedule == "ode":
        raise ValueError("schedule='ode' is deterministic and has no log-prob; use 'flow_grpo', 'dance_grpo' or 'cps'")
    if v_ref is not None:
        check_like("v_ref", v_ref, "v", v)
    for name, t in (
        ("x", x),
        ("x_next", x_next),
        ("v_ref", v_ref),
        ("reward_grad", reward_grad),
        ("guidance_scale", guidance_scale),
        ("sigma", sigma),
        ("sigma_next", sigma_next),
    ):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"sde_log_prob is differentiable in v only, but {name} requires grad; detach it")
    sigma_t, sigma_next_t = _check_sigmas(sigma, sigma_next, x, schedule, sigma_max, noise_level)
    reward_grad, scale_t = _check_guidance(reward_grad, guidance_scale, x)

    backend = resolve(x.device, torch_path=True, kernels="sde")
    if backend == "reference":
        return sde_log_prob_reference(
            x,
            v,
            x_next,
            sigma_t,
            sigma_next_t,
            schedule=schedule,
            noise_level=noise_level,
            sigma_max=sigma_max,
            v_ref=v_ref,
            reward_grad=reward_grad,
            guidance_scale=scale_t if scale_t is not None else 0.0,
        )
    args = (
        x,
        v,
        x_next,
        v_ref,
        reward_grad,
        scale_t,
        sigma_t,
        sigma_next_t,
        schedule,
        _schedule_scale(schedule, noise_level),
        sigma_max,
        backend,
    )
    log_prob, kl = _sde_log_prob_op(*args) if torch.compiler.is_compiling() else _SDELogProb.apply(*args)
    return log_prob if v_ref is None else (log_prob, kl)
