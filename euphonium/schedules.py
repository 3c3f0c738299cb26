"""Noise schedules and guidance coefficients, host side: the sampler's per-step numbers (the ops compute
the same quantities inside their kernels; docs/DESIGN.md section 4)."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from euphonium._checks import check_int, check_positive

GUIDANCE_FORMS = ("lambda", "kl", "rho")


def shifted_sigmas(
    num_steps: int, shift: float = 1.0, *, device: Optional[Union[str, torch.device]] = None
) -> torch.Tensor:
    """Noise levels of an ``N``-step rollout: ``sigma_i = shift * t_i / (1 + (shift - 1) * t_i)``.

    ``t = linspace(1, 0, N + 1)``, so ``sigma_0 = 1`` and ``sigma_N = 0``; ``shift > 1`` spends more
    steps at high noise (SD3/Wan time shift). Returns a float32 tensor of shape ``[N + 1]``, bit for bit
    the ``sigmas`` of ``diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)`` after
    ``set_timesteps(sigmas=linspace(1, 0, N + 1)[:-1])`` (the grid Flow-GRPO and DanceGRPO sample on;
    the scheduler's own ``set_timesteps(N)`` grid stops short of 0 before its appended final 0).
    The model timestep of step ``i`` is ``sigma_i * 1000``.
    """
    check_int("num_steps", num_steps, minimum=1)
    shift = check_positive("shift", shift)
    # float32 arithmetic on float32 grid points, as the diffusers scheduler does, so the two agree exactly
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).to(torch.float32)
    sigmas = shift * t / (1 + (shift - 1) * t)
    return sigmas.to(device) if device is not None else sigmas


def diffusion_coefficient(
    sigma: float, *, schedule: str, noise_level: float, sigma_max: Optional[float] = None
) -> float:
    """The diffusion coefficient ``s`` of the reverse SDE at noise level ``sigma`` (docs/DESIGN.md section 4.1).

    ``flow_grpo``: ``a * sqrt(sigma / (1 - sigma~))`` with ``sigma~ = sigma_max`` at ``sigma == 1``;
    ``dance_grpo``: ``eta``; ``ode``: 0. ``cps`` has no ``s`` (its step is not an Euler-Maruyama step).
    ``ops.sde_step`` evaluates the same ``s`` inside its kernel; this is the host-side value the sampler
    needs for the KL form of the guidance coefficient.
    """
    if schedule == "ode":
        return 0.0
    if schedule == "dance_grpo":
        return float(noise_level)
    if schedule != "flow_grpo":
        raise ValueError(
            f"schedule must be 'flow_grpo', 'dance_grpo' or 'ode' for a diffusion coefficient, got {schedule!r}"
        )
    sigma = float(sigma)
    if sigma == 1.0 and sigma_max is None:
        raise ValueError("sigma_max is required with schedule='flow_grpo' at sigma == 1")
    denominator = 1.0 - (sigma_max if sigma == 1.0 else sigma)
    return float(noise_level) * math.sqrt(sigma / denominator)


def guidance_coefficient(
    sigma: float,
    sigma_next: float,
    *,
    form: str = "lambda",
    lam: float = 0.01,
    beta: Optional[float] = None,
    schedule: str = "dance_grpo",
    noise_level: float = 0.3,
    sigma_max: Optional[float] = None,
) -> float:
    """Guidance coefficient ``c`` of one step, in ``mean_g = mean + c * g`` (``g = grad_x r_p``).

    - ``form="lambda"``: ``c = lam * delta`` with ``delta = sigma - sigma_next`` (Euphonium upstream:
      ``guidance_scale * delta_t``, 0.01 by default).
    - ``form="kl"``: ``c = s^2 / (2 * beta) * delta``, ``s`` the schedule's diffusion coefficient
      (:func:`diffusion_coefficient`), ``beta`` the KL weight: the guidance strength follows the
      noise the step injects (upstream's "KL divergence mode", ``eta^2 / (2 * beta)`` times
      ``delta_t``). With ``dance_grpo``, ``eta = 0.25`` and ``beta = 3.125`` it equals the lambda form
      with ``lam = 0.01`` (upstream's comment on its default).
    """
    if form not in GUIDANCE_FORMS:
        raise ValueError(f"form must be one of {GUIDANCE_FORMS}, got {form!r}")
    delta = float(sigma) - float(sigma_next)
    if form == "lambda":
        return float(lam) * delta
    if beta is None or not beta > 0:
        raise ValueError(f"beta must be > 0 for the KL form of the guidance coefficient, got {beta!r}")
    s = diffusion_coefficient(sigma, schedule=schedule, noise_level=noise_level, sigma_max=sigma_max)
    return s * s / (2.0 * float(beta)) * delta


def noise_std(
    sigma: float, sigma_next: float, *, schedule: str, noise_level: float, sigma_max: Optional[float] = None
) -> float:
    """The noise std of one step, host side: ``s * sqrt(delta)`` (``flow_grpo``, ``dance_grpo``),
    ``sigma_next * sin(a * pi / 2)`` (``cps``), 0 (``ode``); ``ops.sde_step`` computes the same in its kernel."""
    if schedule == "cps":
        return float(sigma_next) * math.sin(float(noise_level) * math.pi / 2)
    s = diffusion_coefficient(sigma, schedule=schedule, noise_level=noise_level, sigma_max=sigma_max)
    return s * math.sqrt(float(sigma) - float(sigma_next))


def per_sample_norm(g: torch.Tensor) -> torch.Tensor:
    """``||g_b||_2`` per sample, ``[B]`` float32, without overflow or underflow: ``m * ||g / m||`` with
    ``m = max |g_b|`` (0 for an all-zero sample)."""
    flat = g.detach().flatten(1).float()
    m = flat.abs().amax(dim=1)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    return torch.where(m > 0, safe * (flat / safe[:, None]).square().sum(dim=1).sqrt(), torch.zeros_like(m))


def rho_coefficient(grad_norm: torch.Tensor, rho: float, std: float) -> torch.Tensor:
    """``c_b = rho * std / ||g_b||`` (``[B]`` float32): each guided shift ``c_b g_b`` has L2 norm ``rho * std``,
    a per-step KL of ``rho^2 / 2`` nats between the guided and unguided Gaussians; 0 where ``g_b = 0``."""
    positive = grad_norm > 0
    return torch.where(positive, (rho * std) / torch.where(positive, grad_norm, 1.0), 0.0).float()
