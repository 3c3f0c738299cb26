"""Flow-GRPO's ``sde_step_with_logprob`` on Euphonium's fused ops.

Switch a Flow-GRPO trainer (``scripts/train_sd3.py`` and its pipeline) with one import::

    - from flow_grpo.diffusers_patch.sd3_sde_with_logprob import sde_step_with_logprob
    + from euphonium.compat.flow_grpo import sde_step_with_logprob

The signature is Flow-GRPO's (``yifan123/flow_grpo``, ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``,
with ``sde_type`` and ``return_sqrt_dt``), and so are the returns: ``(prev_sample, log_prob,
prev_sample_mean, std_dev_t)`` (plus ``sqrt(-dt)`` with ``return_sqrt_dt``), ``prev_sample`` and
``prev_sample_mean`` float32 of the sample's shape, ``log_prob`` float32 ``[B]``, ``std_dev_t`` float32
``[len(timestep), 1, ..., 1]``. The timesteps are looked up in the scheduler as Flow-GRPO does
(``scheduler.index_for_timestep`` for each entry, ``sigma_prev`` the next sigma, ``sigma_max =
scheduler.sigmas[1]`` in the denominator where ``sigma == 1``), and without ``prev_sample`` the noise
is ``diffusers.utils.torch_utils.randn_tensor(shape, generator=generator, device=model_output.device,
dtype=torch.float32)``, Flow-GRPO's call, so a trainer's seeds give the same noise.

What it changes:

- ``log_prob`` is ``euphonium.ops.sde_log_prob`` of ``(sample, model_output, prev_sample)`` in both
  modes (rollout: ``prev_sample=None``; training: the stored ``prev_sample``). Its reduction is
  deterministic and does not depend on the batch a sample is in or on torch's thread count, so the
  training step's log-prob of a stored transition is the rollout's, bit for bit, and the first
  importance ratio is exactly 1. Flow-GRPO's eager ``.mean(dim=...)`` gives different last bits when
  the training batch is not the rollout batch (or the thread count differs).
- With ``model_output`` requiring grad, ``log_prob`` backpropagates through the fused backward, which
  recomputes the mean and saves only the inputs (no fp32 copies of the latents).
- bf16/fp16 ``sample``, ``model_output`` and ``prev_sample`` are read in their dtype (the arithmetic is
  fp32); no fp32 copy of an input is made. The float32 tensors allocated are the outputs Flow-GRPO
  returns in float32: ``prev_sample_mean`` and, in the rollout, ``prev_sample`` (in training a bf16
  ``prev_sample`` is returned as ``prev_sample.float()``, as Flow-GRPO returns it). Flow-GRPO's own
  callers upcast with ``.float()`` before the call; those calls can go.

Where the numbers differ:

- ``sde_type="sde"``: Flow-GRPO's log-prob is the Gaussian log-density, the ops' quantity; values agree
  to fp32 rounding (the ops sum in float64 per sample).
- ``sde_type="cps"``: Flow-GRPO's "log-prob" drops the constants and the ``1 / (2 std^2)``:
  ``-mean((prev_sample - prev_sample_mean)^2)``. This function returns that quantity, derived from the
  ops' exact log-density ``lp`` as ``2 var (lp + log(var) / 2 + log(2 pi) / 2)`` (``var = std^2``), so
  ratios and losses a trainer computes do not change; both modes derive it the same way, so the bits
  still agree. Where ``std == 0`` (``sigma_prev == 0``) the Gaussian is degenerate and the value is
  computed as Flow-GRPO writes it.
- ``prev_sample_mean`` and the rollout's ``prev_sample`` are ``fma``-style fp32 combinations of the
  same per-sample coefficients: equal to Flow-GRPO's to a few fp32 ulps.

``sample`` and ``prev_sample`` are data here (GRPO differentiates the log-prob in the velocity only):
a ``sample`` that requires grad raises. ``noise_level`` must be > 0 (Flow-GRPO's log-prob is NaN at 0).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from euphonium import ops

__all__ = ["sde_step_with_logprob", "SDE_TYPES"]

SDE_TYPES = ("sde", "cps")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _step_indices(scheduler, timestep) -> list:
    """``scheduler.index_for_timestep(t)`` for every entry of ``timestep`` (a number counts as one entry)."""
    if isinstance(timestep, torch.Tensor):
        entries = timestep.reshape(-1) if timestep.dim() == 0 else timestep
    elif isinstance(timestep, (int, float)):
        entries = [timestep]
    else:
        entries = list(timestep)
    if len(entries) == 0:
        raise ValueError("timestep has no entries; pass one timestep or one per sample")
    return [scheduler.index_for_timestep(t) for t in entries]


def sde_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: Union[float, torch.Tensor],
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[Union[torch.Generator, list]] = None,
    sde_type: Optional[str] = "sde",
    return_sqrt_dt: Optional[bool] = False,
):
    """One step of Flow-GRPO's SDE sampler (``sde_type="sde"``) or of its coefficient-preserving one
    (``"cps"``), with the log-prob of ``prev_sample``; Flow-GRPO's function on the fused ops.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` (anything with ``sigmas`` and
            ``index_for_timestep``) whose ``set_timesteps`` ran.
        model_output: the velocity ``[B, ...]``, any float dtype.
        timestep: one timestep or one per sample (a ``[1]`` or ``[B]`` tensor, a list, or a number).
        sample: the latents ``[B, ...]`` at ``timestep``, any float dtype.
        noise_level: ``a`` of the schedule (``std = a sqrt(sigma / (1 - sigma))`` for ``"sde"``,
            ``sigma_prev sin(a pi / 2)`` for ``"cps"``).
        prev_sample: the stored next latents (training); None draws them (rollout).
        generator: a ``torch.Generator`` or a list of them (one per sample), as ``randn_tensor`` takes.
        sde_type: ``"sde"`` or ``"cps"``.
        return_sqrt_dt: also return ``sqrt(-dt)``.

    Returns:
        ``(prev_sample, log_prob, prev_sample_mean, std_dev_t)`` (``+ (sqrt_dt,)``); see the module
        docstring for dtypes and for ``"cps"``'s log-prob.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
        raise TypeError("sample and model_output must be tensors")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output must have the shape of sample {tuple(sample.shape)}, got {tuple(model_output.shape)}"
        )
    batch, ndim, device = sample.shape[0], sample.dim(), sample.device

    index = torch.tensor(_step_indices(scheduler, timestep))
    sigmas = scheduler.sigmas
    sigma_max = sigmas[1].item()
    view = (-1,) + (1,) * (ndim - 1)
    sigma = sigmas[index.to(sigmas.device)].to(device=device, dtype=torch.float32).view(view)
    sigma_prev = sigmas[(index + 1).to(sigmas.device)].to(device=device, dtype=torch.float32).view(view)
    if sigma.shape[0] not in (1, batch):
        raise ValueError(f"timestep must have 1 or {batch} (the batch size) entries, got {sigma.shape[0]}")
    dt = sigma_prev - sigma
    # Per-sample coefficients (Flow-GRPO's expressions on [n, 1, ...] tensors): mean = c_x x + c_v v.
    if sde_type == "sde":
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        c_x = 1 + std_dev_t**2 / (2 * sigma) * dt
        c_v = (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        noise_std = std_dev_t * torch.sqrt(-1 * dt)
        schedule = "flow_grpo"
    else:
        std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
        root = torch.sqrt(torch.clamp_min(sigma_prev**2 - std_dev_t**2, 0))
        c_x = (1 - sigma_prev) + root
        c_v = root * (1 - sigma) - sigma * (1 - sigma_prev)
        noise_std = std_dev_t
        schedule = "cps"

    # The mean in fp32 (Flow-GRPO returns it; differentiable in model_output for its KL term), read
    # from the inputs in their dtype: v * c_v promotes to fp32 without a copy of v, then += x * c_x.
    prev_sample_mean = torch.mul(model_output, c_v).addcmul_(sample, c_x)
    if prev_sample is None:
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32)
        prev_sample = torch.addcmul(prev_sample_mean, noise, noise_std)
    elif prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample must have the shape of sample {tuple(sample.shape)}, got {prev_sample.shape}")

    per_sample = (batch,)
    sigma_b = sigma.reshape(-1).expand(per_sample).contiguous()
    sigma_prev_b = sigma_prev.reshape(-1).expand(per_sample).contiguous()
    at_one = bool((sigma_b == 1).any()) if schedule == "flow_grpo" else False
    log_prob = ops.sde_log_prob(
        sample,
        model_output,
        prev_sample.detach(),
        sigma_b,
        sigma_prev_b,
        schedule=schedule,
        noise_level=float(noise_level),
        sigma_max=sigma_max if at_one else None,
    )
    if sde_type == "cps":
        log_prob = _cps_log_prob(log_prob, prev_sample.detach(), prev_sample_mean, sigma_prev_b, noise_level)

    out = (prev_sample.float(), log_prob, prev_sample_mean, std_dev_t)
    return out + (torch.sqrt(-1 * dt),) if return_sqrt_dt else out


def _cps_log_prob(lp, prev_sample, prev_sample_mean, sigma_prev, noise_level):
    """Flow-GRPO's cps "log-prob" ``-mean((prev_sample - mean)^2)`` from the Gaussian log-density ``lp``.

    ``lp = -S / (2 var) - log(var) / 2 - log(2 pi) / 2`` with ``S = mean((prev_sample - mean)^2)``, so
    ``-S = 2 var (lp + log(var) / 2 + log(2 pi) / 2)`` (float64 on ``[B]``; ``var`` rounded as the ops
    round it). Samples with ``var == 0`` (``sigma_prev == 0``) are computed directly.
    """
    std = sigma_prev * math.sin(noise_level * math.pi / 2)  # fp32, as the ops compute it
    var = (std * std).double()
    stochastic = var > 0
    safe = torch.where(stochastic, var, torch.ones_like(var))
    out = 2 * safe * (lp.double() + 0.5 * torch.log(safe) + _HALF_LOG_2PI)
    out = out.to(lp.dtype)
    if not bool(stochastic.all()):
        rows = (~stochastic).nonzero().reshape(-1)
        direct = -((prev_sample[rows] - prev_sample_mean[rows]) ** 2).mean(dim=tuple(range(1, prev_sample.dim())))
        out = out.index_put((rows,), direct.to(out.dtype))
    return out
