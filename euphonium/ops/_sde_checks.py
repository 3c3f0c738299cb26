"""Input validation of the SDE ops (``sde_step``, ``sde_log_prob``), shared by every backend: the
same one-line errors, the same refusals, whatever runs the arithmetic afterwards."""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from euphonium._checks import check_choice, check_float, check_float_tensor, check_int, check_like, per_sample

SCHEDULES = ("flow_grpo", "dance_grpo", "cps", "ode")
LOGPROB_MEANS = ("unguided", "guided")
_SEED_LIMIT = 2**63
# The range in which every backend computes a step in fp32 without underflow or overflow of its
# per-sample coefficients (so that the reference, the PyTorch path and the kernels, interpreted or on
# a GPU that flushes subnormals, agree): sigma >= 2^-100, a step noise std of 0 (cps at
# sigma_next = 0) or in [2^-40, ...), and the coefficients s^2, h = s^2 delta / (2 sigma), d mean/d x,
# d mean/d v at most 2^40 in magnitude (noise_level at most 2^20, squared by the kernels).
SIGMA_MIN = 2.0**-100
STD_MIN = 2.0**-40
COEF_MAX = 2.0**40
NOISE_LEVEL_MAX = 2.0**20


def _schedule_scale(schedule: str, noise_level: float) -> float:
    """The scalar each schedule's noise is proportional to (for ``cps``: ``sin(a * pi / 2)``)."""
    if schedule == "cps":
        return math.sin(noise_level * math.pi / 2)
    return float(noise_level) if schedule != "ode" else 0.0


# Validation.
# ----------------------------------------------------------------------------------------------


def _check_schedule(schedule, noise_level, sigma_max):
    check_choice("schedule", schedule, SCHEDULES)
    noise_level = check_float("noise_level", noise_level)
    if schedule != "ode" and not noise_level > 0:
        raise ValueError(
            f"noise_level must be a finite number > 0 for schedule={schedule!r} (use schedule='ode' for a "
            f"deterministic step), got {noise_level}"
        )
    if schedule in ("flow_grpo", "dance_grpo") and noise_level > NOISE_LEVEL_MAX:
        raise ValueError(
            f"noise_level must be in (0, 2^20] for schedule={schedule!r} (the fp32 kernels square it), "
            f"got {noise_level}"
        )
    if schedule == "cps" and noise_level > 1:
        raise ValueError(
            "noise_level must be in (0, 1] for schedule='cps' (std = sigma_next * sin(noise_level * pi / 2)), "
            f"got {noise_level}"
        )
    sigma_max = check_float("sigma_max", sigma_max, allow_none=True)
    if sigma_max is not None:
        # In fp32 too, where the kernels read it: 1 - 1e-9 would be 1 and s infinite.
        if not (0 < sigma_max < 1 and _as_fp32(sigma_max) < 1):
            raise ValueError(
                "sigma_max must be in (0, 1) and below 1 in fp32, i.e. at most 1 - 2^-24 (the largest sigma "
                f"below 1 of the schedule), got {sigma_max!r}"
            )
    return noise_level, sigma_max


def _check_latent(name, t):
    check_float_tensor(name, t)
    if t.dim() < 2:
        raise ValueError(
            f"{name} must have a batch dimension and at least one more, shape [B, ...], got shape {tuple(t.shape)}"
        )
    if t.numel() == 0:
        raise ValueError(f"{name} has no elements (shape {tuple(t.shape)})")
    return t


def _check_sigmas(sigma, sigma_next, x, schedule, sigma_max, noise_level):
    """``2^-100 <= sigma <= 1``, ``0 <= sigma_next < sigma`` per sample, ``sigma_max`` where
    ``flow_grpo`` meets ``sigma == 1``, and a step inside fp32's range (``_step_range``).

    Returns the sigmas as [B] float32 tensors on ``x.device`` (one host sync for tensor sigmas).
    """
    batch = x.shape[0]
    for name, value, rule in (
        ("sigma", sigma, "2^-100 <= sigma <= 1"),
        ("sigma_next", sigma_next, "0 <= sigma_next < sigma"),
    ):
        # Numbers far outside [0, 1] (or NaN) are rejected before they are converted to fp32.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= float(value) <= 1:
            raise ValueError(f"{name} must satisfy {rule}, got {value!r}")
    s = per_sample("sigma", sigma, batch, x.device)
    sn = per_sample("sigma_next", sigma_next, batch, x.device)
    scale = _schedule_scale(schedule, noise_level)
    sigma_max32 = None if sigma_max is None else _as_fp32(sigma_max)
    if isinstance(sigma, torch.Tensor) or isinstance(sigma_next, torch.Tensor):
        # One host sync; the checks run in float64 numpy on the fp32 values the kernels see.
        s64, sn64 = torch.stack([s, sn]).cpu().double().numpy()
        with np.errstate(all="ignore"):  # NaN or sigma == 1 without sigma_max: reported by the flags first
            var, coef = _step_range(s64, sn64, schedule, scale, sigma_max32)
            small, large = _out_of_range(var, coef, sn64, schedule)
            flags = [
                bool((~((s64 <= 1) & (s64 >= SIGMA_MIN))).any()),
                bool((~((sn64 >= 0) & (sn64 < s64))).any()),
                bool((s64 == 1).any()),
                bool(small.any()),
                bool(large.any()),
            ]
    else:
        # Checked as the kernels see them: two floats that differ only below fp32 resolution are equal.
        s32, sn32 = _as_fp32(float(sigma)), _as_fp32(float(sigma_next))
        flags = [not SIGMA_MIN <= s32 <= 1, not 0 <= sn32 < s32, s32 == 1]
        if not (flags[0] or flags[1] or (flags[2] and schedule == "flow_grpo" and sigma_max is None)):
            var, coef = _step_range(s32, sn32, schedule, scale, sigma_max32)
            flags += [bool(f) for f in _out_of_range(var, coef, sn32, schedule)]
        else:
            flags += [False, False]
    if flags[0]:
        raise ValueError(f"sigma must satisfy 2^-100 <= sigma <= 1 (finite), got {_describe(sigma)}")
    if flags[1]:
        raise ValueError(
            f"sigma_next must satisfy 0 <= sigma_next < sigma, got sigma_next={_describe(sigma_next)} with "
            f"sigma={_describe(sigma)}"
        )
    if flags[2] and schedule == "flow_grpo" and sigma_max is None:
        raise ValueError(
            "sigma_max is required with schedule='flow_grpo' at sigma == 1 (the coefficient sqrt(sigma / (1 - "
            "sigma)) is infinite there); pass the largest sigma below 1, as Flow-GRPO does"
        )
    if flags[3] or flags[4]:
        _raise_out_of_range(s, sn, schedule, noise_level, scale, sigma_max32, small_first=flags[3])
    return s, sn


def _step_range(s, sn, schedule, scale, sigma_max):
    """``(var, coef)`` per sample in float64 (floats or float64 numpy arrays): the step's noise variance
    ``std^2`` and the largest magnitude among its coefficients ``s^2``, ``h``, ``a_x`` and ``k``
    (``euphonium.ops._sde_torch.coefficients``; written with operators only, for both)."""
    maximum = np.maximum if isinstance(s, np.ndarray) else max
    if schedule == "cps":
        var = (sn * scale) * (sn * scale)
        gap = sn * sn - var
        root = ((gap + abs(gap)) / 2) ** 0.5
        return var, maximum(abs(1 - sn + root), abs(root * (1 - s) - s * (1 - sn)))
    delta = s - sn
    if schedule == "flow_grpo":
        den = s if sigma_max is None else s + (sigma_max - s) * (s == 1)
        s2 = scale * scale * s / (1 - den)
    else:  # dance_grpo: scale = eta; ode: scale = 0
        s2 = scale * scale + 0 * s
    h = s2 * delta / (2 * s)
    coef = maximum(maximum(s2, h), maximum(abs(1 - h), abs(delta + h * (1 - s))))
    return s2 * delta, coef


def _out_of_range(var, coef, sn, schedule):
    """``(std too small, coefficient too large)``: booleans, or [B] bool arrays."""
    if not isinstance(var, np.ndarray):
        small = schedule != "ode" and var < STD_MIN**2 and (schedule != "cps" or sn > 0)
        return small, not coef <= COEF_MAX
    if schedule == "ode":
        small = np.less(var, 0)  # deterministic: no noise to underflow
    elif schedule == "cps":
        small = np.less(var, STD_MIN**2) & np.greater(sn, 0)  # std == 0 at sigma_next == 0: deterministic
    else:
        small = np.less(var, STD_MIN**2)
    return small, np.logical_not(np.less_equal(coef, COEF_MAX))  # NaN counts as too large


def _raise_out_of_range(s, sn, schedule, noise_level, scale, sigma_max, small_first):
    """The one-line error for the first sample whose step leaves fp32's range (error path: on the CPU)."""
    s64, sn64 = torch.stack([s, sn]).detach().cpu().double().numpy()
    var, coef = _step_range(s64, sn64, schedule, scale, sigma_max)
    small, large = _out_of_range(var, coef, sn64, schedule)
    i = int(np.flatnonzero(small if small_first else large)[0])
    where = f"sigma={float(s64[i])!r} -> sigma_next={float(sn64[i])!r} (sample {i})"
    if small_first:
        raise ValueError(
            f"sigma, sigma_next: the step {where} has a noise std of {math.sqrt(float(var[i])):.3g} for "
            f"schedule={schedule!r}, noise_level={noise_level}; std must be >= 2^-40 (about 9.1e-13), or exactly 0 "
            "(cps at sigma_next = 0), for fp32 arithmetic not to underflow: take a larger step or use schedule='ode'"
        )
    raise ValueError(
        f"noise_level={noise_level} (sigma_max={sigma_max}) gives the step {where} coefficients up to "
        f"{float(coef[i]):.3g} for schedule={schedule!r}; they must be <= 2^40 (about 1.1e12) for fp32 "
        "arithmetic not to overflow: lower noise_level, or sigma_max / sigma further below 1"
    )


def _as_fp32(value: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond fp32's range: what a cast to fp32 gives
        return math.copysign(math.inf, value)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {value.detach().cpu().flatten()[:8].tolist()}{' ...' if value.numel() > 8 else ''}"
    return repr(value)


def _check_guidance(reward_grad, guidance_scale, x):
    """``(reward_grad, guidance_scale as [B] float32)``, or ``(None, None)`` without guidance.

    A float ``guidance_scale == 0`` turns guidance off (``reward_grad`` is then not read); a tensor
    scale is always applied (a zero entry leaves that sample's mean unchanged).
    """
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, torch.Tensor)):
        raise TypeError(f"guidance_scale must be a float or a [B] tensor, got {type(guidance_scale).__name__}")
    if isinstance(guidance_scale, (int, float)) and not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite float or a [B] tensor, got {guidance_scale!r}")
    if reward_grad is None:
        if isinstance(guidance_scale, torch.Tensor) or float(guidance_scale) != 0.0:
            per_sample("guidance_scale", guidance_scale, x.shape[0], x.device)
            raise ValueError(
                "guidance_scale is set but reward_grad is None; pass the reward gradient to guide the step"
            )
        return None, None
    check_like("reward_grad", reward_grad, "x", x)
    scale_t = per_sample("guidance_scale", guidance_scale, x.shape[0], x.device)
    if not isinstance(guidance_scale, torch.Tensor) and float(guidance_scale) == 0.0:
        return None, None  # no guidance: skip reading reward_grad
    return reward_grad, scale_t


def _check_seed(seed, noise):
    if seed is None:
        return None
    if noise is not None:
        raise ValueError(
            "pass either noise or seed, not both (seed only seeds the in-kernel noise drawn when noise is None)"
        )
    check_int("seed", seed)
    if not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    return seed


# ----------------------------------------------------------------------------------------------
