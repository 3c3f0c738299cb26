"""Clipped GRPO surrogate: fused forward (loss and statistics) and backward (d loss / d log_prob).

Elements are the flattened ``[B]`` or ``[B, K]`` log-probs; advantages are per element or per
row (``ADV_PER_ROW``: a ``[B]`` advantage broadcast over ``K`` steps). Each forward program writes
its partial sums (of ``x / N``: no overflow where the plain sum would) to its own row of a
``[programs, 6]`` buffer that the launcher reduces with torch (deterministic: no float atomics).
The backward recomputes the ratio from the saved inputs instead of saving it.

NaN in any input of an element gives NaN in the loss, its gradient and every statistic it enters
(``tl.minimum``/``tl.maximum`` with ``propagate_nan``); a ratio that overflows (log ratio above
~88.7) follows ``euphonium.ops.grpo``'s rule.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from euphonium.kernels.aot import AOTSpec

ALL = tl.constexpr(tl.PropagateNan.ALL)

# Columns of the forward's partial buffer.
N_PARTIALS = 6  # clipped-surrogate sum, kl sum, clipped count, approx-kl sum, sum(ratio - 1), max |ratio - 1|


@triton.jit
def _ratio_and_advantage(
    logp_ptr, old_ptr, adv_ptr, offs, mask, K, adv_clip, ADV_PER_ROW: tl.constexpr, CLIP_ADV: tl.constexpr
):
    b_lp = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b_old = tl.load(old_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ADV_PER_ROW:
        b_a = tl.load(adv_ptr + offs // K, mask=mask, other=0.0).to(tl.float32)
    else:
        b_a = tl.load(adv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CLIP_ADV:
        # NaN stays NaN (the default min/max would return the bound), as in torch.clamp.
        b_a = tl.minimum(tl.maximum(b_a, -adv_clip, propagate_nan=ALL), adv_clip, propagate_nan=ALL)
    b_log_ratio = b_lp - b_old
    return b_log_ratio, tl.exp(b_log_ratio), b_a


@triton.jit
def _clip_and_branch(b_ratio, b_a, clip_range):
    """``clip(ratio)`` (NaN stays NaN) and where the clipped branch of the max is taken (flat): A > 0
    above the range, A < 0 below it, and A = 0 (both branches are 0: no 0 * inf when the ratio
    overflows). Decided by signs, not by the product A (ratio - clip), which can underflow."""
    b_clipped = tl.minimum(
        tl.maximum(b_ratio, 1.0 - clip_range, propagate_nan=ALL), 1.0 + clip_range, propagate_nan=ALL
    )
    b_flat = ((b_a > 0.0) & (b_ratio > b_clipped)) | ((b_a < 0.0) & (b_ratio < b_clipped))
    b_flat = b_flat | ((b_a == 0.0) & (b_ratio == b_ratio))
    return b_clipped, b_flat


@triton.jit
def _ratio_stats(x):
    """``ratio - 1`` and ``exp(x) - 1 - x`` (approx KL), accurate near 0 and for large |x|.

    Both cancel catastrophically near x = 0, where ratios live (|x| ~ 1e-4): a Taylor series there
    keeps the statistics accurate in fp32. Elsewhere ``exp(x) - 1`` directly (``x + akl`` would
    lose ``ratio - 1 = -1`` under ``akl = |x|`` for x = -1e20), and an overflowed ratio gives inf
    (not inf - inf).
    """
    series = x * x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x / 720.0))))
    small = tl.abs(x) < 0.1
    em1 = tl.where(small, x + series, tl.exp(x) - 1.0)
    akl = tl.where(small, series, tl.where(em1 == float("inf"), em1, em1 - x))
    return em1, akl


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=ALL)


@triton.jit
def _grpo_loss_fwd_kernel(
    logp_ptr,
    old_ptr,
    adv_ptr,
    kl_ptr,
    partial_ptr,
    N,
    K,
    clip_range,
    adv_clip,
    ADV_PER_ROW: tl.constexpr,
    CLIP_ADV: tl.constexpr,
    HAS_KL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_p = tl.program_id(0)
    offs = i_p * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    b_log_ratio, b_ratio, b_a = _ratio_and_advantage(
        logp_ptr, old_ptr, adv_ptr, offs, mask, K, adv_clip, ADV_PER_ROW, CLIP_ADV
    )
    b_clipped, b_flat = _clip_and_branch(b_ratio, b_a, clip_range)
    b_loss = tl.where(b_flat, -b_a * b_clipped, -b_a * b_ratio)
    b_em1, b_akl = _ratio_stats(b_log_ratio)
    b_dev = tl.abs(b_em1)
    # Sums of x / N: a mean that cannot overflow where the sum would (+-3e38 terms).
    inv_n = 1.0 / N.to(tl.float32)
    p_out = partial_ptr + i_p * 6
    tl.store(p_out + 0, tl.sum(tl.where(mask, b_loss * inv_n, 0.0), axis=0))
    if HAS_KL:
        b_kl = tl.load(kl_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(p_out + 1, tl.sum(b_kl * inv_n, axis=0))
    else:
        tl.store(p_out + 1, 0.0)
    tl.store(p_out + 2, tl.sum(tl.where(mask & (b_dev > clip_range), 1.0, 0.0), axis=0))
    tl.store(p_out + 3, tl.sum(tl.where(mask, b_akl * inv_n, 0.0), axis=0))
    tl.store(p_out + 4, tl.sum(tl.where(mask, b_em1 * inv_n, 0.0), axis=0))
    tl.store(p_out + 5, tl.reduce(tl.where(mask, b_dev, 0.0), 0, _max_keep_nan))


@triton.jit
def _grpo_loss_bwd_kernel(
    grad_ptr,
    logp_ptr,
    old_ptr,
    adv_ptr,
    dlogp_ptr,
    dkl_ptr,
    N,
    K,
    clip_range,
    adv_clip,
    inv_n,
    kl_coef,
    ADV_PER_ROW: tl.constexpr,
    CLIP_ADV: tl.constexpr,
    HAS_KL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i_p = tl.program_id(0)
    offs = i_p * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(grad_ptr).to(tl.float32) * inv_n
    _, b_ratio, b_a = _ratio_and_advantage(logp_ptr, old_ptr, adv_ptr, offs, mask, K, adv_clip, ADV_PER_ROW, CLIP_ADV)
    # The clipped branch wins (and is flat) where A (ratio - clip(ratio)) > 0, or A = 0; at ties both
    # branches have the unclipped slope -A * ratio. NaN inputs give NaN.
    _, b_flat = _clip_and_branch(b_ratio, b_a, clip_range)
    # -A g first: -A ratio alone can overflow where the gradient, a 1/N of it, is finite.
    b_d = tl.where(b_flat, 0.0, b_ratio * (-b_a * g))
    tl.store(dlogp_ptr + offs, b_d.to(dlogp_ptr.dtype.element_ty), mask=mask)
    if HAS_KL:
        b_dkl = tl.zeros([BLOCK], dtype=tl.float32) + g * kl_coef
        tl.store(dkl_ptr + offs, b_dkl.to(dkl_ptr.dtype.element_ty), mask=mask)


def _block(n: int) -> int:
    return min(max(triton.next_power_of_2(n), 128), 1024)


# Same formula: ops.grpo.grpo_loss_ref (spec), ops.grpo._GRPOLossTorch (PyTorch path).
def grpo_loss_forward(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    kl: Optional[torch.Tensor],
    *,
    clip_range: float,
    adv_clip: Optional[float],
    kl_coef: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Loss (fp32 0-d) and ``[clip_frac, approx_kl, ratio_mean, ratio_max_dev, policy_loss, kl]``.

    Inputs are contiguous, ``log_prob``/``old_log_prob``/``kl`` of one shape ``[B]`` or ``[B, K]``
    and ``advantages`` of that shape or ``[B]``. Nothing is synchronised with the host.
    """
    n = log_prob.numel()
    if n >= 2**31:
        raise ValueError(f"log_prob has {n} elements; the kernels index them with 32-bit offsets (< 2^31)")
    cols = n // log_prob.shape[0]
    block = _block(n)
    programs = triton.cdiv(n, block)
    partial = torch.empty((programs, N_PARTIALS), dtype=torch.float32, device=log_prob.device)
    _grpo_loss_fwd_kernel[(programs,)](
        log_prob,
        old_log_prob,
        advantages,
        kl if kl is not None else log_prob,
        partial,
        n,
        cols,
        float(clip_range),
        float(adv_clip if adv_clip is not None else 0.0),
        ADV_PER_ROW=advantages.numel() != n,
        CLIP_ADV=adv_clip is not None,
        HAS_KL=kl is not None,
        BLOCK=block,
        num_warps=4,
    )
    sums = partial[:, :5].sum(0)
    policy, kl_mean = sums[0], sums[1]
    loss = policy + kl_coef * kl_mean if kl is not None else policy
    max_dev = partial[:, 5].max()
    # A NaN ratio has no side of the clip range: the fraction is NaN then, like every ratio stat.
    clip_frac = torch.where(max_dev.isnan(), max_dev, sums[2] / n)
    stats = torch.stack([clip_frac, sums[3], 1 + sums[4], max_dev, policy, kl_mean])
    return loss, stats


# Same gradient: ops.grpo.grpo_loss_ref (spec, by autograd), ops.grpo._GRPOLossTorch.backward (PyTorch path).
def grpo_loss_backward(
    grad_loss: torch.Tensor,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    kl: Optional[torch.Tensor],
    *,
    clip_range: float,
    adv_clip: Optional[float],
    kl_coef: float,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``d loss / d log_prob`` (dtype of ``log_prob``) and ``d loss / d kl`` (or None without ``kl``)."""
    n = log_prob.numel()
    cols = n // log_prob.shape[0]
    block = _block(n)
    dlogp = torch.empty_like(log_prob)
    dkl = torch.empty_like(kl) if kl is not None else None
    _grpo_loss_bwd_kernel[(triton.cdiv(n, block),)](
        grad_loss.contiguous(),
        log_prob,
        old_log_prob,
        advantages,
        dlogp,
        dkl if dkl is not None else dlogp,
        n,
        cols,
        float(clip_range),
        float(adv_clip if adv_clip is not None else 0.0),
        1.0 / n,
        float(kl_coef),
        ADV_PER_ROW=advantages.numel() != n,
        CLIP_ADV=adv_clip is not None,
        HAS_KL=kl is not None,
        BLOCK=block,
        num_warps=4,
    )
    return dlogp, dkl


_FWD_SIG = {
    "logp_ptr": "*fp32",
    "old_ptr": "*fp32",
    "adv_ptr": "*fp32",
    "kl_ptr": "*fp32",
    "partial_ptr": "*fp32",
    "N": "i32",
    "K": "i32",
    "clip_range": "fp32",
    "adv_clip": "fp32",
}
_BWD_SIG = {
    "grad_ptr": "*fp32",
    "logp_ptr": "*fp32",
    "old_ptr": "*fp32",
    "adv_ptr": "*fp32",
    "dlogp_ptr": "*fp32",
    "dkl_ptr": "*fp32",
    "N": "i32",
    "K": "i32",
    "clip_range": "fp32",
    "adv_clip": "fp32",
    "inv_n": "fp32",
    "kl_coef": "fp32",
}
_ALIGNED = ("logp_ptr", "old_ptr", "adv_ptr", "kl_ptr", "N")

AOT_SPECS = [
    AOTSpec(
        "grpo_loss_fwd_per_row_adv",
        _grpo_loss_fwd_kernel,
        _FWD_SIG,
        dict(ADV_PER_ROW=True, CLIP_ADV=True, HAS_KL=False, BLOCK=1024),
        aligned=("logp_ptr", "old_ptr", "N"),
    ),
    AOTSpec(
        "grpo_loss_fwd_kl",
        _grpo_loss_fwd_kernel,
        _FWD_SIG,
        dict(ADV_PER_ROW=False, CLIP_ADV=True, HAS_KL=True, BLOCK=1024),
        aligned=_ALIGNED,
    ),
    AOTSpec(
        "grpo_loss_bwd_per_row_adv",
        _grpo_loss_bwd_kernel,
        _BWD_SIG,
        dict(ADV_PER_ROW=True, CLIP_ADV=True, HAS_KL=False, BLOCK=1024),
        aligned=("logp_ptr", "old_ptr", "dlogp_ptr", "N"),
    ),
    AOTSpec(
        "grpo_loss_bwd_kl",
        _grpo_loss_bwd_kernel,
        _BWD_SIG,
        dict(ADV_PER_ROW=False, CLIP_ADV=True, HAS_KL=True, BLOCK=1024),
        aligned=("logp_ptr", "old_ptr", "adv_ptr", "dlogp_ptr", "dkl_ptr", "N"),
    ),
]
