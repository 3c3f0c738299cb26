"""DanceGRPO's ``flux_step`` (and upstream Euphonium's guided one) on Euphonium's fused ops.

Switch a DanceGRPO trainer (``fastvideo/train_grpo_*.py``) or upstream Euphonium's
(``euphonium/grpo/grpo_sampling/flux_step.py``) with one import::

    - def flux_step(...): ...              # delete the trainer's own copy, or its import
    + from euphonium.compat.dance_grpo import flux_step

One function serves both: DanceGRPO's positional signature ``(model_output, latents, eta, sigmas,
index, prev_sample, grpo, sde_solver)`` followed by upstream Euphonium's guidance keywords
(``use_reward_gradient``, ``reward_gradient``, ``reward_gradient_scale``, ``normalize_reward_gradient``,
``reward_gradient_kl_beta``, the same five for SPSA, ``use_reward_guided_mean_for_logprob``,
``use_delta_t_for_gradient_scaling``), with upstream's defaults; without a gradient it is DanceGRPO's
step. The returns are the peers': ``(prev_sample, pred_original_sample, log_prob)`` with ``grpo``,
``(prev_sample_mean, pred_original_sample)`` without, in the dtype the peers' expressions give
(``torch.promote_types(latents.dtype, model_output.dtype)``; float32 for their float32 latents), and
the rollout's noise is ``torch.randn_like`` of that dtype from the global generator, so
``torch.manual_seed`` gives the same samples.

The step (``delta = sigma - sigma_next``, DanceGRPO's ``sde_solver`` drift)::

    mean     = x - delta v - (eta^2 delta / (2 sigma)) (x + (1 - sigma) v)  [+ c g]    std = eta sqrt(delta)
    log_prob = mean_i(-(prev_sample - m)^2 / (2 std^2)) - log(std) - log(2 pi) / 2

with upstream's guidance ``c g``: ``g`` the PRM (and/or SPSA) gradient, divided by its norm over the
whole tensor (``+ 1e-8``) when ``normalize_*``, ``c`` the scale (``eta^2 / (2 kl_beta)`` when the scale
is negative) times ``delta`` when ``use_delta_t_for_gradient_scaling``; ``m`` is the guided mean when
``use_reward_guided_mean_for_logprob`` (upstream's default) and the unguided one otherwise.

What it changes:

- The rollout (``grpo=True``, ``prev_sample=None``) is one ``ops.sde_step`` on the drawn noise (the
  fused kernel on CUDA): ``prev_sample``, ``pred_original_sample`` and the unguided log-prob in one
  pass. Training (a stored ``prev_sample``) takes ``ops.sde_log_prob``, differentiable in
  ``model_output`` through the fused backward (saves only the inputs). The two give the same bits on
  the same transition, whatever the batch it is in, so the first importance ratio is exactly 1.
- The guided-mean log-prob is ``ops.sde_log_prob`` at ``prev_sample - c g`` (the Gaussian around
  ``mean + c g`` is the one around ``mean`` shifted by ``c g``), in both modes, so it is bit-equal
  between them too. (``ops.sde_log_prob`` has no guidance input yet; this costs one fp32 latent-sized
  temporary per call.)
- bf16 ``model_output`` (the autocast output the peers pass) is read as it is; the arithmetic is fp32.

Where the numbers differ from the peers': they round ``dsigma * model_output`` and
``sigma * model_output`` to bf16 when ``model_output`` is bf16 (a 0-d sigma tensor does not promote);
the ops do not round before the fp32 sum. Otherwise the results agree to fp32 rounding. With
``normalize_reward_gradient`` the norm is the whole tensor's, as upstream computes it: training
recomputes it from the stored gradient, so a training batch must hold the rollout batch's gradient
tensor for the guided log-prob (and the ratio) to repeat.

Not supported: ``grpo=True`` with ``sde_solver=False`` (an Euler mean with DanceGRPO's noise, which
no published trainer uses and the ops have no schedule for) raises ``ValueError``. With
``grpo=True`` and no ``prev_sample``, ``prev_sample`` is returned detached (the peers' carries the
graph of ``model_output``, which no trainer uses); ``log_prob`` is differentiable when grad is on.
"""

from __future__ import annotations

from typing import Optional

import torch

from euphonium import ops

__all__ = ["flux_step"]


def _guidance_term(gradient, use, scale, normalize, kl_beta, eta, delta_t):
    """``(g, c)`` of one of upstream's guidance terms (shift ``c g``), or None where it adds nothing."""
    if not use or gradient is None:
        return None
    norm = gradient.norm()
    if not bool(norm > 0):
        return None
    c = scale if scale >= 0 else eta**2 / (2 * kl_beta)
    if delta_t is not None:
        c = c * delta_t
    if normalize:
        c = c / float(norm + 1e-8)  # the denominator in the gradient's dtype, as upstream adds it
    return gradient, float(c)


def _shift(terms, like: torch.Tensor):
    """The guidance as ``(reward_grad, guidance_scale)`` for the ops: one term as it is, two summed in fp32."""
    if not terms:
        return None, 0.0
    if len(terms) == 1:
        return terms[0]
    total = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for g, c in terms:
        total.add_(g, alpha=c)
    return total, 1.0


def _shifted(prev_sample: torch.Tensor, g: torch.Tensor, c: float) -> torch.Tensor:
    """``prev_sample - c g`` in fp32 (the argument of the guided-mean log-prob)."""
    if torch.promote_types(prev_sample.dtype, g.dtype) == torch.float32:
        return torch.add(prev_sample.detach(), g, alpha=-c)
    out = torch.empty(prev_sample.shape, dtype=torch.float32, device=prev_sample.device)
    return out.copy_(prev_sample.detach()).add_(g, alpha=-c)


def _pred_original(latents, model_output, sigma, dtype):
    """``latents - sigma * model_output`` (differentiable; fp32 arithmetic) in ``dtype``."""
    return torch.add(latents, model_output, alpha=-sigma).to(dtype)


def flux_step(
    model_output: torch.Tensor,
    latents: torch.Tensor,
    eta: float,
    sigmas: torch.Tensor,
    index: int,
    prev_sample: Optional[torch.Tensor],
    grpo: bool,
    sde_solver: bool,
    use_reward_gradient: bool = True,
    reward_gradient: Optional[torch.Tensor] = None,
    reward_gradient_scale: float = 0.1,
    normalize_reward_gradient: bool = True,
    reward_gradient_kl_beta: float = 0.1,
    use_spsa_reward_gradient: bool = False,
    spsa_reward_gradient: Optional[torch.Tensor] = None,
    spsa_gradient_scale: float = 0.1,
    normalize_spsa_gradient: bool = True,
    spsa_gradient_kl_beta: float = 0.1,
    use_reward_guided_mean_for_logprob: bool = True,
    use_delta_t_for_gradient_scaling: bool = False,
):
    """One step ``sigmas[index] -> sigmas[index + 1]`` of DanceGRPO's sampler (upstream Euphonium's with a
    reward gradient); see the module docstring. ``sigmas`` is the schedule (a tensor or a sequence)."""
    if not isinstance(latents, torch.Tensor) or not isinstance(model_output, torch.Tensor):
        raise TypeError("model_output and latents must be tensors")
    if grpo and not sde_solver:
        raise ValueError(
            "grpo=True with sde_solver=False (an Euler mean with DanceGRPO's noise) is not supported by the fused "
            "ops; DanceGRPO's and upstream Euphonium's trainers call flux_step with sde_solver=True"
        )
    sigma_t, sigma_next_t = sigmas[index], sigmas[index + 1]
    sigma, sigma_next = float(sigma_t), float(sigma_next_t)
    delta_t = float(sigma_t - sigma_next_t)  # in the schedule's dtype, as the peers subtract
    dtype = torch.promote_types(latents.dtype, model_output.dtype)
    scaling = delta_t if use_delta_t_for_gradient_scaling else None
    terms = [
        t
        for t in (
            _guidance_term(
                reward_gradient,
                use_reward_gradient,
                reward_gradient_scale,
                normalize_reward_gradient,
                reward_gradient_kl_beta,
                eta,
                scaling,
            ),
            _guidance_term(
                spsa_reward_gradient,
                use_spsa_reward_gradient,
                spsa_gradient_scale,
                normalize_spsa_gradient,
                spsa_gradient_kl_beta,
                eta,
                scaling,
            ),
        )
        if t is not None
    ]
    g, c = _shift(terms, latents)

    if not grpo:
        return _mean_step(model_output, latents, eta, sigma, sigma_next, sde_solver, g, c, dtype)

    guided_logprob = g is not None and use_reward_guided_mean_for_logprob
    kw = dict(schedule="dance_grpo", noise_level=float(eta))

    def log_prob_of(x_next):
        target = _shifted(x_next, g, c) if guided_logprob else x_next.detach()
        return ops.sde_log_prob(latents, model_output, target, sigma, sigma_next, **kw)

    if prev_sample is not None:  # training: the stored transition's log-prob under the current velocity
        return prev_sample, _pred_original(latents, model_output, sigma, dtype), log_prob_of(prev_sample)

    noise = torch.randn(latents.shape, dtype=dtype, device=latents.device)  # torch.randn_like(prev_sample_mean)
    with torch.no_grad():
        out = ops.sde_step(
            latents.detach(),
            model_output.detach(),
            sigma,
            sigma_next,
            reward_grad=g,
            guidance_scale=c,
            noise=noise,
            **kw,
        )
    x_next = out.x_next.to(dtype)
    differentiable = torch.is_grad_enabled() and model_output.requires_grad
    if guided_logprob or differentiable:
        log_prob = log_prob_of(x_next)
    else:
        log_prob = out.log_prob  # the same bits as ops.sde_log_prob(latents, model_output, x_next)
    x0 = _pred_original(latents, model_output, sigma, dtype) if differentiable else out.x0_pred.to(dtype)
    return x_next, x0, log_prob


def _mean_step(model_output, latents, eta, sigma, sigma_next, sde_solver, g, c, dtype):
    """``grpo=False``: ``(prev_sample_mean, pred_original_sample)``, the mean guided when a gradient is given."""
    delta = sigma - sigma_next
    h = eta**2 * delta / (2 * sigma) if sde_solver else 0.0
    shape = (1,) * latents.dim()  # one-element fp32 tensors: v * k promotes bf16 v to fp32 without a copy
    a_x = torch.full(shape, 1 - h, dtype=torch.float32, device=latents.device)
    k = torch.full(shape, -delta - h * (1 - sigma), dtype=torch.float32, device=latents.device)
    mean = torch.mul(model_output, k).addcmul_(latents, a_x)
    if g is not None:
        mean = mean.add_(g, alpha=c)
    return mean.to(dtype), _pred_original(latents, model_output, sigma, dtype)
